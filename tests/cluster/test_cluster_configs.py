"""The cluster launch examples: `ray up` YAMLs validate against Ray's cluster-config schema, and the
KubeRay RayService's serveConfigV2 against Serve's config schema (its app args against AppConfig)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "clusters"


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_ray_up_yaml_validates_against_rays_cluster_schema(name):
    """The file as written validates against ray/autoscaler/ray-schema.json, and so does what `ray up`
    validates: the file with Ray's defaults filled in (Ray's own validator)."""
    jsonschema = pytest.importorskip("jsonschema")
    import json
    import os

    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())
    config = yaml.safe_load((EXAMPLES / name).read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))
    assert any("msa-cluster" in c for c in config["setup_commands"])
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # Ray 2.60 token auth


def test_ray_up_yaml_schema_rejects_a_bad_file():
    """The validator used above does reject a broken config (a misspelt top-level key)."""
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((EXAMPLES / "aws.yaml").read_text())
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def test_aws_yaml_has_gpu_workers():
    """The AWS workers are GPU instances, and the head takes no shard (CPU 0)."""
    config = yaml.safe_load((EXAMPLES / "aws.yaml").read_text())
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))


def test_rayservice_serve_config_validates_against_serve_schema():
    """serveConfigV2 is a valid Serve deploy config, and its application args a valid AppConfig."""
    from ray.serve.schema import ServeDeploySchema

    from msa_cluster.cluster.config import AppConfig

    manifest = yaml.safe_load((EXAMPLES / "rayservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)
    [app] = schema.applications
    assert app.import_path == "msa_cluster.cluster.serve_app:build_app"
    cfg = AppConfig.model_validate(app.args)
    assert cfg.store.startswith("s3://") and cfg.cluster.start
    with pytest.raises(Exception, match="import_path"):
        ServeDeploySchema.model_validate({"applications": [{"name": "x", "route_prefix": "/"}]})

"""Write tests/model/data/golden_tiny.json: reference outputs of the bundled tiny checkpoint.

Run only when a change is meant to alter numbers; the golden test then guards every refactor.
"""

import json
from pathlib import Path

from msa_cluster.model.golden import golden_outputs

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "tests" / "model" / "data" / "golden_tiny.json"
    out.write_text(json.dumps(golden_outputs(), indent=1) + "\n")
    print(out.name)

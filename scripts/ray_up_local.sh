#!/usr/bin/env bash
# `ray up` with the local provider, for real, on loopback addresses of this one machine; then an
# ingestion job (`ray job submit -- msa ingest ...`), the Serve app, one question over HTTP, and
# `ray down`. A script to run by hand (minutes), not a CI test.
#
#   scripts/ray_up_local.sh            # HEAD_IP=127.0.0.6 WORKER_IP=127.0.0.7 by default; KEEP=1 keeps the work dir
#
# How it reaches the "nodes" without a network: `ray up` talks SSH, and each SSH connection is
# served by its own `sshd -i` started through ssh's ProxyCommand (no daemon, no port), with a key
# pair and host key made here; the head's autoscaler reaches the worker through an sshd on the
# worker's address (port 22). It installs openssh-server and rsync with apt-get when missing.
# Ray 2.60 turns token auth on by default; on loopback the nodes run with RAY_AUTH_MODE=disabled.
#
# This machine may run other Ray clusters. `ray down` (and `ray stop`) stop every Ray process of a
# machine, so the nodes' sessions get a `ray` on their PATH whose `stop` ends only the processes
# of this cluster (found by its temp dir, ended by pid); everything else goes to the real `ray`.
# Side effect: `ray up` writes ~/ray_bootstrap_config.yaml and ~/ray_bootstrap_key.pem.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HEAD_IP=${HEAD_IP:-127.0.0.6}
WORKER_IP=${WORKER_IP:-127.0.0.7}
GCS_PORT=${GCS_PORT:-6390}
DASH_PORT=${DASH_PORT:-8275}
HTTP_PORT=${HTTP_PORT:-8010}
PY=$(command -v python3 || command -v python)
REAL_RAY=$(command -v ray)
WORK=$(mktemp -d /tmp/msa-rayup.XXXXXX)
RAY_TMP="$WORK/rt"
START=$(date +%s)
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
say() { printf '[%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# 1. sshd and rsync --------------------------------------------------------------------------------
if [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null || ! command -v ssh >/dev/null; then
  say "installing openssh-server and rsync"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client rsync >/dev/null
fi
mkdir -p /run/sshd  # sshd's privilege-separation directory

# 2. keys, sshd config, and the nodes' `ray` --------------------------------------------------------
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
mkdir -p "$WORK/bin"
cat > "$WORK/bin/ray" <<EOF
#!/usr/bin/env bash
# \`ray stop\` ends only this cluster's processes (by pid); anything else is the real ray.
if [ "\${1:-}" = stop ]; then
  for sig in TERM KILL; do
    pids=\$(pgrep -f -- "$RAY_TMP" || true)
    [ -z "\$pids" ] && exit 0
    for p in \$pids; do [ "\$p" != "\$\$" ] && kill -\$sig "\$p" 2>/dev/null || true; done
    sleep 3
  done
  exit 0
fi
exec "$REAL_RAY" "\$@"
EOF
chmod +x "$WORK/bin/ray"
# Ray runs every node command as `bash --login -c -i 'source ~/.bashrc; ... (CMD)'`, and a login
# shell resets PATH: each session's command is rewritten to put the nodes' `ray` first after that.
cat > "$WORK/session.sh" <<'EOF'
#!/usr/bin/env bash
cmd=${SSH_ORIGINAL_COMMAND:-bash}
cmd=${cmd//"source ~/.bashrc;"/"source ~/.bashrc; export PATH=@WORK@/bin:\$PATH RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=@REPO@;"}
exec bash -c "$cmd"
EOF
sed -i "s|@WORK@|$WORK|g; s|@REPO@|$REPO|g" "$WORK/session.sh"
chmod +x "$WORK/session.sh"
cat > "$WORK/sshd_config" <<EOF
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/id_ed25519.pub
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
ForceCommand $WORK/session.sh
EOF
# Refuse to go on unless a node session's `ray` is the one above (a real `ray stop` would end
# every Ray process of this machine).
SSH=(ssh -i "$WORK/id_ed25519" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
     -o "ProxyCommand=/usr/sbin/sshd -i -f $WORK/sshd_config")
got=$("${SSH[@]}" "$(id -un)@$HEAD_IP" "bash --login -c -i 'source ~/.bashrc; export X=1 && (command -v ray)'" 2>/dev/null | tail -1)
if [ "$got" != "$WORK/bin/ray" ]; then
  echo "ray_up_local.sh: a node session would run '$got', not $WORK/bin/ray; stopping before ray up" >&2
  exit 1
fi

# 3. the cluster YAML: examples/clusters/local.yaml with loopback nodes -----------------------------
CLUSTER="$WORK/cluster.yaml"
"$PY" - "$REPO/examples/clusters/local.yaml" "$CLUSTER" <<EOF
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
common = "--temp-dir=$RAY_TMP --num-cpus=2 --memory=2000000000 --object-store-memory=150000000 --disable-usage-stats"
cfg.update(
    cluster_name="msa-loopback",
    provider={"type": "local", "head_ip": "$HEAD_IP", "worker_ips": ["$WORKER_IP"]},
    auth={"ssh_user": "$(id -un)", "ssh_private_key": "$WORK/id_ed25519",
          "ssh_proxy_command": "/usr/sbin/sshd -i -f $WORK/sshd_config"},
    file_mounts={},  # token auth is off on loopback: no token to copy
    setup_commands=[],  # this checkout is already installed here (PYTHONPATH points at it)
    # autoscaler v1: the v2 monitor of Ray 2.60 did not launch the local provider's worker here
    head_start_ray_commands=["ray stop", f"RAY_enable_autoscaler_v2=0 ray start --head --node-ip-address=$HEAD_IP --port=$GCS_PORT "
                             f"--dashboard-host=$HEAD_IP --dashboard-port=$DASH_PORT "
                             f"--autoscaling-config=~/ray_bootstrap_config.yaml {common}"],
    worker_start_ray_commands=[f"ray start --address=$HEAD_IP:$GCS_PORT --node-ip-address=$WORKER_IP {common}"],
)
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
EOF

# The head's autoscaler reaches the worker with plain ssh (the head's copy of the config drops the
# proxy command): an sshd daemon on the worker's address, port 22, stopped by its pid at the end.
/usr/sbin/sshd -D -f "$WORK/sshd_config" -o "ListenAddress=$WORKER_IP:22" &
SSHD_PID=$!

cleanup() {
  kill "$SSHD_PID" 2>/dev/null || true
  say "ray down"
  "$REAL_RAY" down -y "$CLUSTER" >"$WORK/down.log" 2>&1 || say "ray down failed (see $WORK/down.log)"
  "$WORK/bin/ray" stop  # the worker too: the local provider's ray down leaves it running
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else say "kept $WORK"; fi
  say "done"
}
trap cleanup EXIT

# 4. ray up ---------------------------------------------------------------------------------------
say "ray up (head $HEAD_IP, worker $WORKER_IP)"
"$REAL_RAY" up -y --no-config-cache "$CLUSTER" >"$WORK/up.log" 2>&1 || { tail -40 "$WORK/up.log"; exit 1; }
for _ in $(seq 60); do
  n=$("$PY" -c "import ray; ray.init(address='$HEAD_IP:$GCS_PORT', logging_level='ERROR'); print(sum(x['Alive'] for x in ray.nodes()))" 2>/dev/null || echo 0)
  [ "$n" -ge 2 ] && break
  sleep 2
done
say "cluster up: $n nodes"
[ "$n" -ge 2 ] || say "WARNING: the worker node did not join; going on with the head alone"

# 5. an ingestion job ------------------------------------------------------------------------------
STORE="file://$WORK/memory"
say "ray job submit -- msa ingest (the bundled sample corpus)"
"$REAL_RAY" job submit --address "http://$HEAD_IP:$DASH_PORT" \
  --runtime-env-json "{\"env_vars\": {\"PYTHONPATH\": \"$REPO\", \"RAY_AUTH_MODE\": \"disabled\"}}" -- \
  "$PY" -m msa_cluster.cluster.cli ingest "$REPO/msa_cluster/assets/sample_corpus.jsonl" --store "$STORE" \
  --model msa-tiny --tenant acme --encoder-cpus 0.5 > "$WORK/ingest.log" 2>&1
grep -E "inserted|rejected [0-9]|succeeded" "$WORK/ingest.log" || true

# 6. the Serve app and a question over HTTP ------------------------------------------------------------
KEY=$("$PY" -m msa_cluster.cluster.cli keys --keys-file "$WORK/keys.json" create --tenant acme 2>/dev/null)
cat > "$WORK/serve.yaml" <<EOF
proxy_location: HeadOnly
http_options: {host: $HEAD_IP, port: $HTTP_PORT}
applications:
  - name: msa
    route_prefix: /
    import_path: msa_cluster.cluster.serve_app:build_app
    runtime_env: {env_vars: {PYTHONPATH: "$REPO", RAY_AUTH_MODE: disabled}}
    args:
      store: $STORE
      model: msa-tiny
      auth: {keys_file: $WORK/keys.json}
      deployment: {num_replicas: 1, num_cpus: 0.5}
      cluster: {name: msa, namespace: msa, start: true, num_shards: 2, cpus_per_actor: 0.25}
EOF
say "serve deploy"
serve deploy "$WORK/serve.yaml" --address "http://$HEAD_IP:$DASH_PORT"
for _ in $(seq 150); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" "http://$HEAD_IP:$HTTP_PORT/readyz" || true)
  [ "$code" = 200 ] && break
  sleep 2
done
[ "$code" = 200 ] || { say "the app did not become ready (last HTTP $code)"; exit 1; }
say "query over HTTP"
"$PY" -m msa_cluster.cluster.cli query "What is the special magic number for Rourzul?" \
  --url "http://$HEAD_IP:$HTTP_PORT" --api-key "$KEY" --max-tokens 32
say "ray up -> ingest -> answered query took $(( $(date +%s) - START ))s"

#!/usr/bin/env bash
# 2 prefillers + 2 decoders + the lmcache-pd proxy on this host (CPU build of vLLM),
# with a tiny random-weight model built locally. Ctrl-C stops everything.
#
#   examples/disagg_xpyd/launch.sh [MODEL_DIR]
#
# then, in another shell:
#   curl -s http://127.0.0.1:9000/v1/completions -H 'Content-Type: application/json' \
#     -d '{"model": "tiny", "prompt": "the cache the engine the request", "max_tokens": 16, "temperature": 0}'
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MODEL="${1:-${TMPDIR:-/tmp}/lmcache-pd-tiny-model}"
LOGS="${LOGS:-${TMPDIR:-/tmp}/lmcache-pd-xpyd-logs}"
P_PORTS=(${P_PORTS:-8100 8101})       # prefiller HTTP ports
D_PORTS=(${D_PORTS:-8200 8201})       # decoder HTTP ports
KV_PORTS=(${KV_PORTS:-7300 7310})     # decoder control ports (rank r listens on port + r)
PROXY_PORT="${PROXY_PORT:-9000}"
mkdir -p "$LOGS"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# all four engines must share the control-plane secret (a file or this env var)
export LMCACHE_PD_AUTH_SECRET="${LMCACHE_PD_AUTH_SECRET:-$(python -c 'import secrets; print(secrets.token_hex(32))')}"

python -m lmcache_pd.integration.vllm.tiny_model "$MODEL" >/dev/null

kv_config() {  # role yaml
  printf '{"kv_connector":"LMCachePDConnector","kv_connector_module_path":"lmcache_pd.integration.vllm","kv_role":"%s","kv_connector_extra_config":{"config_file":"%s"}}' "$1" "$2"
}
# Cores: engine i (P0, D0, P1, D1) gets the i-th quarter of the cores when there are at
# least 4; with fewer, engines alternate over the cores so a prefiller and a decoder never
# share one (P0 and P1 on core 0, D0 and D1 on core 1 on a 2-core box). vLLM's CPU
# workers spin for a while after each step: engines on the same core slow each other.
NCPU="$(nproc)"
bind_for() {  # engine index 0..3
  if [ "$NCPU" -ge 4 ]; then
    local q=$((NCPU / 4)) lo hi
    lo=$(($1 * q)); hi=$((lo + q - 1))
    if [ "$lo" -eq "$hi" ]; then echo "$lo"; else echo "$lo-$hi"; fi
  elif [ "$NCPU" -ge 2 ]; then
    echo $(($1 % 2))
  else
    echo auto
  fi
}
serve() {  # port role yaml log cores
  VLLM_CPU_OMP_THREADS_BIND="$5" python -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name tiny \
    --host 127.0.0.1 --port "$1" --max-model-len 512 --dtype float32 --enforce-eager \
    --kv-transfer-config "$(kv_config "$2" "$3")" >"$4" 2>&1 &
  PIDS+=("$!")
}
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
PIDS=()
trap cleanup EXIT INT TERM

PROXY_ARGS=()
for i in 0 1; do
  serve "${P_PORTS[$i]}" kv_producer "$HERE/prefiller.yaml" "$LOGS/prefiller$i.log" "$(bind_for $((2 * i)))"
  PROXY_ARGS+=(--prefiller "http://127.0.0.1:${P_PORTS[$i]}")
done
for i in 0 1; do
  # env overrides the yaml, as in LMCache: each decoder its own control port
  LMCACHE_PD_PEER_INIT_PORT="${KV_PORTS[$i]}" \
    serve "${D_PORTS[$i]}" kv_consumer "$HERE/decoder.yaml" "$LOGS/decoder$i.log" "$(bind_for $((2 * i + 1)))"
  PROXY_ARGS+=(--decoder "http://127.0.0.1:${D_PORTS[$i]}" --decoder-kv "127.0.0.1:${KV_PORTS[$i]}")
done
for port in "${P_PORTS[@]}" "${D_PORTS[@]}"; do
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "engine on $port did not start; see $LOGS"; exit 1; }
done
lmcache-pd proxy "${PROXY_ARGS[@]}" --handoff-port 0 --port "$PROXY_PORT" >"$LOGS/proxy.log" 2>&1 &
PIDS+=("$!")
sleep 2
echo "proxy on http://127.0.0.1:$PROXY_PORT over 2 prefillers + 2 decoders (logs in $LOGS). Try:"
echo "  curl -s http://127.0.0.1:$PROXY_PORT/v1/completions -H 'Content-Type: application/json' -d '{\"model\": \"tiny\", \"prompt\": \"the cache the engine the request\", \"max_tokens\": 16, \"temperature\": 0}'"
wait

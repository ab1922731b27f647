#!/usr/bin/env bash
# 1 prefiller + 1 decoder + the lmcache-pd proxy on this host (CPU build of vLLM),
# with a tiny random-weight model built locally. Ctrl-C stops everything.
#
#   examples/disagg_1p1d/launch.sh [MODEL_DIR]
#
# then, in another shell:
#   curl -s http://127.0.0.1:9000/v1/completions -H 'Content-Type: application/json' \
#     -d '{"model": "tiny", "prompt": "the cache the engine the request", "max_tokens": 16, "temperature": 0}'
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MODEL="${1:-${TMPDIR:-/tmp}/lmcache-pd-tiny-model}"
LOGS="${LOGS:-${TMPDIR:-/tmp}/lmcache-pd-disagg-logs}"
P_PORT="${P_PORT:-8100}"; D_PORT="${D_PORT:-8200}"; PROXY_PORT="${PROXY_PORT:-9000}"
KV_PORT="${KV_PORT:-7300}"
mkdir -p "$LOGS"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# prefiller and decoder must share the control-plane secret (a file or this env var)
export LMCACHE_PD_AUTH_SECRET="${LMCACHE_PD_AUTH_SECRET:-$(python -c 'import secrets; print(secrets.token_hex(32))')}"

python -m lmcache_pd.integration.vllm.tiny_model "$MODEL" >/dev/null

kv_config() {  # role yaml
  printf '{"kv_connector":"LMCachePDConnector","kv_connector_module_path":"lmcache_pd.integration.vllm","kv_role":"%s","kv_connector_extra_config":{"config_file":"%s"}}' "$1" "$2"
}
# Two CPU engines on one host: give each its own cores, or vLLM puts both on core 0 and
# their spinning workers slow each other down (measured: decoder TTFT 1 s instead of 0.1 s).
NCPU="$(nproc)"
if [ "$NCPU" -ge 2 ]; then
  HALF=$((NCPU / 2))
  span() { if [ "$1" -eq "$2" ]; then echo "$1"; else echo "$1-$2"; fi; }
  P_BIND="$(span 0 $((HALF - 1)))"; D_BIND="$(span "$HALF" $((NCPU - 1)))"
else
  P_BIND=auto; D_BIND=auto
fi
serve() {  # port role yaml log cores
  VLLM_CPU_OMP_THREADS_BIND="$5" python -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name tiny \
    --host 127.0.0.1 --port "$1" --max-model-len 512 --dtype float32 --enforce-eager \
    --kv-transfer-config "$(kv_config "$2" "$3")" >"$4" 2>&1 &
  PIDS+=("$!")
}
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
PIDS=()
trap cleanup EXIT INT TERM

serve "$P_PORT" kv_producer "$HERE/prefiller.yaml" "$LOGS/prefiller.log" "$P_BIND"
export LMCACHE_PD_PEER_INIT_PORT="$KV_PORT"   # env overrides the yaml, as in LMCache
serve "$D_PORT" kv_consumer "$HERE/decoder.yaml" "$LOGS/decoder.log" "$D_BIND"
unset LMCACHE_PD_PEER_INIT_PORT
for port in "$P_PORT" "$D_PORT"; do
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "engine on $port did not start; see $LOGS"; exit 1; }
done
lmcache-pd proxy --prefiller "http://127.0.0.1:$P_PORT" --decoder "http://127.0.0.1:$D_PORT" \
  --decoder-kv "127.0.0.1:$KV_PORT" --handoff-port 0 --port "$PROXY_PORT" >"$LOGS/proxy.log" 2>&1 &
PIDS+=("$!")
sleep 2
echo "proxy on http://127.0.0.1:$PROXY_PORT (logs in $LOGS). Try:"
echo "  curl -s http://127.0.0.1:$PROXY_PORT/v1/completions -H 'Content-Type: application/json' -d '{\"model\": \"tiny\", \"prompt\": \"the cache the engine the request\", \"max_tokens\": 16, \"temperature\": 0}'"
wait

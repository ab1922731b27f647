#!/usr/bin/env bash
# One vLLM engine (CPU build) with LMCachePDConnector in kv_both mode: CPU + disk tiers.
# Builds a tiny random-weight model locally. Ctrl-C stops the engine.
#
#   examples/kv_both/launch.sh [MODEL_DIR]
#
# then send the same long prompt twice; the second is served from the tiers:
#   P=$(python -c "print('the cache the engine the request ' * 60)")
#   curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
#     -d "{\"model\": \"tiny\", \"prompt\": \"$P\", \"max_tokens\": 16, \"temperature\": 0}"
# and look for "hit tokens" and "Retrieved" in the engine log.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MODEL="${1:-${TMPDIR:-/tmp}/lmcache-pd-tiny-model}"
PORT="${PORT:-8000}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"

python -m lmcache_pd.integration.vllm.tiny_model "$MODEL" >/dev/null
CONFIG="{\"kv_connector\":\"LMCachePDConnector\",\"kv_connector_module_path\":\"lmcache_pd.integration.vllm\",\"kv_role\":\"kv_both\",\"kv_connector_extra_config\":{\"config_file\":\"$HERE/kv_both.yaml\"}}"
# --no-enable-prefix-caching: every reused token then visibly comes from our tiers
exec python -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name tiny \
  --host 127.0.0.1 --port "$PORT" --max-model-len 512 --dtype float32 --enforce-eager \
  --no-enable-prefix-caching --kv-transfer-config "$CONFIG"

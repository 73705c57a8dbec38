#!/usr/bin/env bash
# Download into .whl/ (repo root, git-ignored) the wheels that the GPU kit carries to the device machine
# (Python 3.12, x86-64, no network; its package list: /work/.library/device/KINDS.md).
#
#   bash benchmarks/gpu/fetch_wheels.sh        # here, where pip reaches PyPI; then run(carry=[".whl"], ...)
#
# The list is the import closure of the code paths benchmarks/gpu/run_gpu.sh runs (`xrayops synth`,
# `xrayops ingest`, `xrayops pretrain`, benchmarks/bench_train.py, benchmarks/few_label.py), traced by
# running each (sys.modules at exit, `python -X importtime`), less what the device image already holds.
# Each is pinned to our .venv's version (pyproject.toml) and needs a cp312 or py3 wheel.
#
# Imported here but deliberately NOT carried:
#   python-gdcm, pylibjpeg-libjpeg  pydicom/pylibjpeg probe them behind try/except (plugin discovery);
#                                   the synthetic data needs only RLE (pylibjpeg-rle) and JPEG 2000
#                                   (pylibjpeg-openjpeg to encode, Pillow/OpenJPEG to decode).
#   dill, pydot, defusedxml        optional imports of torch / torchvision (try/except).
#   pytz, tzdata                   pandas 2.x's; the device's pandas (>= 3, it has neither) needs neither.
#   lightly's own requirements     (hydra-core, lightly-utils, aenum, pytorch-lightning, ...): the
#                                   modules xrayops.models.ssl imports (lightly.loss, lightly.models.modules,
#                                   lightly.models.utils, lightly.utils.dist/scheduler) import none of them.
# Carried although the device has it: typing-extensions (pydantic 2.14.4 and pydantic-core 2.50.5 require
# >= 4.16.0; the device's version is not known, and the pure 45 kB wheel settles it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/.whl"
PIP="${PIP:-python3 -m pip}"

# name==version  (what imports it on the kit's paths)
WHEELS=(
  "pydantic==2.14.4"            # xrayops.config, contracts, PretrainConfig, augment params
  "pydantic-core==2.50.5"       # pydantic (compiled: cp312)
  "annotated-types==0.8.0"      # pydantic
  "typing-inspection==0.4.5"    # pydantic, pydantic-settings
  "typing-extensions==4.16.0"   # pydantic, pydantic-core (floor 4.16.0); see above
  "pydantic-settings==2.16.3"   # xrayops.config (XRAYOPS_* settings)
  "python-dotenv==1.2.4"        # pydantic-settings (imported at import time)
  "structlog==26.1.0"           # xrayops.logs
  "pydicom==3.0.2"              # synth (writes DICOM), ingest (reads it)
  "pylibjpeg==2.1.0"            # pydicom's RLE / JPEG 2000 plugin host
  "pylibjpeg-openjpeg==2.6.0"   # synth's JPEG 2000 lossless encoder (compiled: cp312)
  "pylibjpeg-rle==2.2.0"        # synth's RLE encoder, ingest's RLE decoder (compiled: cp312)
  "lightly==1.6.0"              # xrayops.models.ssl (NT-Xent loss, projection heads)
)

# The platform tags of the device README; pip matches manylinux_2_N exactly, so several are named.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

# Warn where our venv moved on from a pin (pyproject.toml is the source of truth for both).
if [[ -x "$ROOT/.venv/bin/pip" ]]; then
  freeze="$("$ROOT/.venv/bin/pip" freeze 2>/dev/null | tr 'A-Z_' 'a-z-')"
  for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"
    have="$(grep -E "^${name}==" <<<"$freeze" || true)"
    [[ -n "$have" && "$have" != "$spec" ]] && echo "WARNING: .venv has $have, the kit pins $spec" >&2
  done
fi

tmp="$(mktemp -d)"; err="$(mktemp)"
trap 'rm -rf "$tmp" "$err"' EXIT
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
if ! $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none "${platform_args[@]}" -d "$tmp" "${WHEELS[@]}" 2>"$err"; then
  grep -v "is ignored: it is neither" "$err" >&2; exit 1
fi
grep -v "is ignored: it is neither" "$err" >&2 || true   # pip's notes on this machine's local index folders

# Exactly one wheel per name, or the device's install stops.
n="$(ls "$tmp"/*.whl | wc -l)"
if [[ "$n" -ne "${#WHEELS[@]}" ]]; then
  echo "ERROR: got $n wheels for ${#WHEELS[@]} names:" >&2; ls "$tmp" >&2; exit 1
fi
mkdir -p "$DEST"
rm -f "$DEST"/*.whl   # only now: a failed download leaves the old set in place
mv "$tmp"/*.whl "$DEST"/

# What each wheel requires (extras skipped), so a need not carried and not on the device shows up here.
echo "Requires-Dist of the carried wheels (no extras):"
for whl in "$DEST"/*.whl; do
  reqs="$(unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
          | sed 's/^Requires-Dist: //' | paste -sd ';' - || true)"
  printf '  %-55s %s\n' "$(basename "$whl")" "${reqs:--}"
done
echo "Wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %9d  %s\n", $5, $NF}'
total="$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)"
echo "total: $total bytes ($(( total / 1024 )) KiB) in ${#WHEELS[@]} wheels"
if (( total > 48 * 1024 * 1024 )); then
  echo "ERROR: over 48 MiB; the working tree plus carried paths must stay under 64 MiB" >&2; exit 1
fi

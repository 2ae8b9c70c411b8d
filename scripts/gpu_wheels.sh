#!/usr/bin/env bash
# The two packages the GPU machine's image lacks, for scripts/gpu_check.sh (carry [".whl"]): torchattacks (the
# evaluation cross-checks) and pyautoattack (standard AutoAttack). Their own needs (scipy, requests, tqdm,
# numpy, torch, torchvision) are in that image already. Both are pure Python: they travel unpacked in
# .whl/site (added to PYTHONPATH there), without pyautoattack's 45 MB of example models, so the call's
# working tree stays far under its 64 MiB (0.7 MiB here).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl/site
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  "torchattacks==3.5.1" "pyautoattack==0.2.0"
for w in .whl/*.whl; do
  python3 -m zipfile -e "$w" .whl/site
done
rm -rf .whl/site/pyautoattack/examples .whl/*.whl
du -sh .whl

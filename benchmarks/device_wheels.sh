#!/usr/bin/env bash
# The wheels a device call carries (`carry: [".whl"]`): what the GPU machine lacks of the project's needs
# (pydantic and its companions, torch-fidelity) and of the peer (diffusers, from ../shared/bench/wheels), for its
# Python 3.12. The versions are this checkout's venv's, so both machines run the same code. Run from the repo root:
#   bash benchmarks/device_wheels.sh        # then .whl/ holds ~9 MiB; .git/info/exclude must list /.whl/
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
names=()
for n in pydantic pydantic_core annotated-types typing-inspection typing_extensions torch-fidelity; do
  names+=("$n==$(version "$n")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${names[@]}"
cp -f ../shared/bench/wheels/*.whl .whl/ 2>/dev/null || echo "no peer wheel in ../shared/bench/wheels" >&2
ls .whl

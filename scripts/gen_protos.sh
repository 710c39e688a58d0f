#!/usr/bin/env bash
# Regenerates the Python code of every .proto under protos/ next to its source:
# protos/tessera/<area>/v1/x.proto -> protos/tessera/<area>/v1/x_pb2.py, x_pb2.pyi, x_pb2_grpc.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
find protos -name '*_pb2*.py' -delete
find protos -name '*_pb2*.pyi' -delete
mapfile -t files < <(cd protos && find . -name '*.proto' | sed 's|^\./||' | LC_ALL=C sort)
(cd protos && "../$PY" -m grpc_tools.protoc -I . \
  --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. \
  --plugin=protoc-gen-mypy="$(cd .. && pwd)/.venv/bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(cd .. && pwd)/.venv/bin/protoc-gen-mypy_grpc" \
  "${files[@]}")
# Every generated folder is a regular package.
find protos/tessera protos/inference -type d -exec sh -c 'test -f "$1/__init__.py" || : > "$1/__init__.py"' _ {} \;
echo "generated ${#files[@]} proto files"

# The two commands a new user types: `make run` (serve a model) and `make test`.
# Everything else is a step they call. All Python runs from .venv, made by `make install`.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
RUNS   ?= runs
MODELS ?= models
PORT   ?= 50051
METRICS_PORT ?= 9090
CHECKPOINT ?= $(RUNS)/digits/best.pt
NAME   ?= digits
MNIST_DIR ?= ../shared/data/mnist

.PHONY: install test train train-mnist features evaluate export model run proto clean

install: $(VENV)/.installed

# Torch first, pinned, so pip takes the CPU wheel where one is at hand instead of resolving a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[serve,cpu,train,dev]"
	touch $@

test: install
	$(PY) -m pytest -q

# The small default model: 8x8 digits bundled with scikit-learn, trains in seconds, no network.
train: install
	$(PY) -m training --dataset digits --epochs 40 --out $(RUNS)/digits

# The MNIST recipe measured in README.md.
train-mnist: install
	$(PY) -m training --dataset mnist --data-dir $(MNIST_DIR) --epochs 30 --batch-size 128 \
		--latent-dim 32 --widths 32,64 --hidden 512 --warmup-epochs 1 --out $(RUNS)/mnist

# Serve the model repository; on a fresh checkout, train and export the small digits model first.
run: install
	@if [ -z "$$(ls -A $(MODELS) 2>/dev/null)" ]; then $(MAKE) --no-print-directory model; fi
	$(PY) -m service --model-repo $(MODELS) --port $(PORT) --metrics-port $(METRICS_PORT)

model: train
	$(MAKE) --no-print-directory export

export: install
	$(PY) -m export --checkpoint $(CHECKPOINT) --out $(MODELS) --name $(NAME)

features: install
	$(PY) -m training.features --dataset digits --out $(RUNS)/features-digits

evaluate: install
	$(PY) -m training.evaluate --checkpoint $(RUNS)/mnist/best.pt --k 1000 --images 1000

# Generated code is committed (the serving image needs no grpcio-tools); tests/test_proto.py proves it current.
# The -I mapping makes the generated imports read `from service.api.vae.v1 import vae_pb2`.
PROTO_OUT := service/api
proto:
	$(PY) -m grpc_tools.protoc -I$(PROTO_OUT)=proto --python_out=. --pyi_out=. --grpc_python_out=. proto/vae/v1/vae.proto
	touch $(PROTO_OUT)/__init__.py $(PROTO_OUT)/vae/__init__.py $(PROTO_OUT)/vae/v1/__init__.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

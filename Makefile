# The two commands a new user types: `make run` (serve a model) and `make test`.
# Everything else is a step they call. All Python runs from .venv, made by `make install`.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
RUNS   ?= runs
MODELS ?= models
PORT   ?= 50051
HTTP_PORT ?= 8000
METRICS_PORT ?= 9090
CHECKPOINT ?= $(RUNS)/digits/best.pt
NAME   ?= digits
MNIST_DIR ?= ../shared/data/mnist
TWEMOJI_DIR ?= ../shared/data/twemoji
TWEMOJI_EPOCHS ?= 120

.PHONY: install test bench-loading train train-mnist train-mnist-flow train-mnist-ae train-mnist-cond train-twemoji train-twemoji-flow \
	train-twemoji-ae train-twemoji-cond train-twemoji-hvae train-mnist-hvae train-twemoji-hvae-cond train-mnist-hvae-cond train-mnist-hvae-long train-mnist-hvae-longer \
	features evaluate export model run bench proto clean

install: $(VENV)/.installed

# Torch first, pinned, so pip takes the CPU wheel where one is at hand instead of resolving a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[serve,cpu,train,dev]"
	touch $@

# Each test runs its processes on one thread (tests/conftest.py), so two workers fill two cores;
# a file's tests stay on one worker, which trains its fixtures once.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The small default model: 8x8 digits bundled with scikit-learn, no network, about a minute with its
# classifier; the recipe and its figures are in docs/training.md ("The digits recipe").
train: install $(RUNS)/features-digits/features.pt
	$(PY) -m training --dataset digits --epochs 40 --likelihood gaussian --gaussian-std 0.15 --widths 32,64 \
		--batch-size 32 --lr 3e-3 --free-bits 0 --classifier $(RUNS)/features-digits/features.pt --out $(RUNS)/digits

$(RUNS)/features-digits/features.pt: | install
	$(PY) -m training.features --dataset digits --out $(RUNS)/features-digits

# The MNIST recipe and its flow-prior and autoencoder variants, measured in docs/training.md
# ("The MNIST recipe"); the classifier judges their samples.
MNIST_RECIPE = --dataset mnist --data-dir $(MNIST_DIR) --epochs 30 --batch-size 128 --latent-dim 32 --widths 32,64 \
	--hidden 512 --warmup-epochs 1 --free-bits 0 --eval-images 2000 --classifier $(RUNS)/features-mnist/features.pt

# One recipe, four models: train-NAME (the VAE), train-NAME-flow (its flow prior), train-NAME-ae
# (the autoencoder baseline) and train-NAME-cond (class-conditional, its marginal likelihood at
# k=100: each image costs classes x k decoder rows), each with the recipe's classifier trained
# first when missing.
define RECIPE_TARGETS
train-$(1): install $$(RUNS)/features-$(1)/features.pt
	$$(PY) -m training $$($(2)) --out $$(RUNS)/$(1)

train-$(1)-flow: install $$(RUNS)/features-$(1)/features.pt
	$$(PY) -m training $$($(2)) --prior flow --out $$(RUNS)/$(1)-flow

train-$(1)-ae: install $$(RUNS)/features-$(1)/features.pt
	$$(PY) -m training $$($(2)) --model ae --out $$(RUNS)/$(1)-ae

train-$(1)-cond: install $$(RUNS)/features-$(1)/features.pt
	$$(PY) -m training $$($(2)) --conditional --iwae-k 100 --out $$(RUNS)/$(1)-cond
endef
$(eval $(call RECIPE_TARGETS,mnist,MNIST_RECIPE))

$(RUNS)/features-mnist/features.pt: | install
	$(PY) -m training.features --dataset mnist --data-dir $(MNIST_DIR) --out $(RUNS)/features-mnist

# Your own images, on real ones: the 3,781 Twemoji PNGs (RGBA, one folder per category) at 32x32 RGB
# on white, with the discretized logistic mixture, judged in bits/dim against lossless PNG and WebP
# and by the category classifier; measured in docs/training.md ("The Twemoji recipe"). The decoded
# folder is cached under $(RUNS)/cache, never in the (read-only) data folder.
TWEMOJI_DATA = --dataset folder --data-dir $(TWEMOJI_DIR) --image-size 32 --channels 3 --background white \
	--cache-dir $(RUNS)/cache
TWEMOJI_RECIPE = $(TWEMOJI_DATA) --likelihood logistic-mixture --mixtures 5 --widths 64,128 --latent-dim 64 \
	--hidden 512 --batch-size 64 --lr 2e-3 --epochs $(TWEMOJI_EPOCHS) --hflip --iwae-k 100 \
	--classifier $(RUNS)/features-twemoji/features.pt
$(eval $(call RECIPE_TARGETS,twemoji,TWEMOJI_RECIPE))

# The hierarchical VAE on the same images (docs/training.md, "The hierarchical VAE on Twemoji"):
# about 40 minutes of training on this 2-core machine when nothing else runs.
TWEMOJI_HVAE_RECIPE = $(TWEMOJI_DATA) --likelihood logistic-mixture --mixtures 5 --model hvae --width 96 \
	--groups 8:3,4:3,2:2 --batch-size 64 --lr 2e-3 --epochs 70 --hflip --iwae-k 100 --grad-clip 200 --free-bits 0 \
	--warmup-epochs 3 --classifier $(RUNS)/features-twemoji/features.pt
train-twemoji-hvae: install $(RUNS)/features-twemoji/features.pt
	$(PY) -m training $(TWEMOJI_HVAE_RECIPE) --top-prior 6 --top-prior-scale 1.15 --out $(RUNS)/twemoji-hvae

train-twemoji-hvae-cond: install $(RUNS)/features-twemoji/features.pt
	$(PY) -m training $(TWEMOJI_HVAE_RECIPE) --conditional --out $(RUNS)/twemoji-hvae-cond

# The hierarchical VAE on MNIST (docs/training.md, "The hierarchical VAE on MNIST"): about an hour of
# training on this 2-core machine when nothing else runs, then IWAE k=1000 on 2,000 test images.
MNIST_HVAE_RECIPE = --dataset mnist --data-dir $(MNIST_DIR) --model hvae --groups 7:1,4:2,2:2 --width 64 \
	--z-channels 8 --blocks 0 --batch-size 128 --lr 2e-3 --epochs 19 --grad-clip 200 --free-bits 0 --warmup-epochs 1 \
	--eval-images 2000 --iwae-k 1000 --classifier $(RUNS)/features-mnist/features.pt
train-mnist-hvae: install $(RUNS)/features-mnist/features.pt
	$(PY) -m training $(MNIST_HVAE_RECIPE) --out $(RUNS)/mnist-hvae

# Continue run $(1) into run $(2) to $(3) epochs: its last.pt is copied once, then resumed. The cosine
# schedule is a function of the epoch and the epoch count, so this is a warm restart.
define continue-mnist-hvae
@test -f $(RUNS)/$(2)/last.pt || { mkdir -p $(RUNS)/$(2) && cp $(RUNS)/$(1)/last.pt $(RUNS)/$(2)/; }
$(PY) -m training $(MNIST_HVAE_RECIPE) --epochs $(3) --resume --out $(RUNS)/$(2)
endef

# More time (docs/training.md, "More time"): the recipe's run continued to 40 epochs, about 85 minutes more, then
# its k=1000 evaluation (83 minutes); the learning rate restarts where a 40-epoch run is at epoch 20.
train-mnist-hvae-long: $(RUNS)/mnist-hvae/last.pt install $(RUNS)/features-mnist/features.pt
	$(call continue-mnist-hvae,mnist-hvae,mnist-hvae-long,40)

# A second warm restart: the 40-epoch run continued to 56 epochs (about 50 minutes more, then the same
# evaluation); the learning rate restarts at 19% of its peak.
train-mnist-hvae-longer: $(RUNS)/mnist-hvae-long/last.pt install $(RUNS)/features-mnist/features.pt
	$(call continue-mnist-hvae,mnist-hvae-long,mnist-hvae-longer,56)

# A continued run's starting point, missing: said in one line before anything is installed or trained.
$(RUNS)/%/last.pt:
	@echo "this recipe continues make train-$*'s run ($@ is missing): run that first" >&2; exit 2

train-mnist-hvae-cond: install $(RUNS)/features-mnist/features.pt
	$(PY) -m training $(MNIST_HVAE_RECIPE) --conditional --iwae-k 100 --out $(RUNS)/mnist-hvae-cond

$(RUNS)/features-twemoji/features.pt: | install
	$(PY) -m training.features $(TWEMOJI_DATA) --out $(RUNS)/features-twemoji

# Serve the model repository (gRPC on PORT, HTTP on HTTP_PORT); on a fresh checkout, train and export the
# small digits model first.
run: install
	@if [ -z "$$(ls -A $(MODELS) 2>/dev/null)" ]; then $(MAKE) --no-print-directory model; fi
	$(PY) -m service --model-repo $(MODELS) --port $(PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT)

model: train
	$(MAKE) --no-print-directory export

export: install
	$(PY) -m export --checkpoint $(CHECKPOINT) --out $(MODELS) --name $(NAME)

# Throughput and latency beside their limits (docs/benchmarks.md); quick mode takes about a minute.
bench: install
	@if [ -z "$$(ls -A $(MODELS) 2>/dev/null)" ]; then $(MAKE) --no-print-directory model; fi
	$(PY) -m bench --quick --model-repo $(MODELS) --json $(RUNS)/bench.json

# Loading a folder of images (docs/benchmarks.md): first decode against bare Pillow, the cached second
# start, training memory with the folder ten times over. About two minutes on the Twemoji folder.
bench-loading: install
	$(PY) -m bench.loading --folder $(TWEMOJI_DIR) --image-size 32 --json $(RUNS)/bench-loading.json

features: $(RUNS)/features-digits/features.pt

evaluate: install
	$(PY) -m training.evaluate --checkpoint $(RUNS)/mnist/best.pt --k 1000 --images 2000

# Generated code is committed (the serving image needs no grpcio-tools); tests/test_service_lifecycle.py::test_generated_code_is_current proves it current.
# The -I mapping makes the generated imports read `from service.api.vae.v1 import vae_pb2`.
PROTO_OUT := service/api
PROTOS    := proto/vae/v1/vae.proto proto/inference/grpc_service.proto
proto:
	$(PY) -m grpc_tools.protoc -I$(PROTO_OUT)=proto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $(PROTO_OUT)/__init__.py $(PROTO_OUT)/vae/__init__.py $(PROTO_OUT)/vae/v1/__init__.py $(PROTO_OUT)/inference/__init__.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# ---- The serving image (Dockerfile, deploy/) -------------------------------------------------------
# `make image` builds the CPU target as $(IMAGE) with podman, from a local Debian base image (no image
# registry is reachable here) and wheels downloaded beforehand (pip cannot reach the index inside a
# build here). Elsewhere, `docker build --target cpu .` needs neither.
IMAGE      ?= localhost/vae-serve:latest
GPU_IMAGE  ?= localhost/vae-serve:gpu
BASE_IMAGE ?= localhost/vae-base:bookworm
PODMAN     ?= podman
IMAGE_ARGS ?=
PIP_WHEEL  ?= pip==26.0.1
WHEELS     := deploy/wheels
export CONTAINERS_CONF ?= $(CURDIR)/deploy/containers.conf
PODMAN_BUILD = $(PODMAN) build --isolation chroot --network host --format docker

.PHONY: image image-gpu base-image wheels podman

# Said in one line, before anything else runs: what is missing, and what works instead.
podman:
	@command -v $(PODMAN) >/dev/null 2>&1 || { echo "make image needs $(PODMAN): apt-get install podman runc debootstrap (or, with Docker: docker build --target cpu -t vae-serve .)" >&2; exit 1; }

image: podman base-image wheels
	$(PODMAN_BUILD) --target cpu --build-arg BASE=$(BASE_IMAGE) $(IMAGE_ARGS) -t $(IMAGE) .
	@$(PODMAN) image inspect --format '$(IMAGE): {{.Size}} bytes' $(IMAGE)

# Needs a registry that serves the CUDA base image (GPU_BASE in the Dockerfile) and the package index.
image-gpu: podman
	$(PODMAN_BUILD) --target gpu $(IMAGE_ARGS) -t $(GPU_IMAGE) .

base-image: podman
	bash deploy/base-image.sh $(BASE_IMAGE)

# Wheels for the base image's CPython 3.11 on glibc 2.36 (bookworm), whatever Python runs pip here.
wheels: $(WHEELS)/.downloaded
$(WHEELS)/.downloaded: deploy/requirements-cpu.txt
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
		--python-version 3.11 --implementation cp --abi cp311 \
		$(foreach p,2014 _2_17 _2_27 _2_28 _2_34,--platform manylinux$(p)_x86_64) \
		--dest $(WHEELS) --requirement deploy/requirements-cpu.txt "$(PIP_WHEEL)"
	touch $@

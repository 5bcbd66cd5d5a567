"""Tensor parallelism: a model split Megatron-style over the MPI ranks of ``mpirun``.

ONNX Runtime's pip wheel has no collective op (a graph with ``com.microsoft:AllReduce`` fails to
load), so each rank runs its shard of the model as a chain of small ONNX graphs cut where the
split needs a sum over ranks, and sums the partial results with mpi4py between them::

    rank r:  h ─▶ [attention shard of layer i] ─▶ partial ─▶ Allreduce ─▶ h + sum
               ─▶ [MLP shard of layer i]       ─▶ partial ─▶ Allreduce ─▶ h + sum ─▶ ... ─▶ [head] ─▶ logits

* ``sharding.py``: which heads and hidden units rank r holds (``Shard``), the rules when N does
  not divide them.
* ``gpt2.py``: the GPT-2 layout of an Optimum export (weights found by the exporter's node
  names), this rank's weights, and its segment graphs.
* ``runner.py``: :class:`TensorParallelRunner`, the decoding runner (``runners.Runner``) that
  runs those segments and all-reduces between them; the steppers of ``steppers.py`` drive it as
  they drive the host runner, through a :class:`GraphSignature` of the original export.
* ``comm.py``: the all-reduce, and how a dead or failing rank is noticed.
* ``local.py``: what ``Generator(..., tensor_parallel=True)`` runs on: the worker program in
  this rank's process (the MPI rank owns MPI; see DESIGN.md "MPI"), behind the pool's interface.
"""

"""The model: a decoder-only Transformer whose FFNs are expert layers chosen by ``moe.name``.

Routing algorithms are pure functions (``routing``, ``auction``), tokens move through a
``TokenDispatcher`` (``dispatch``), the experts are stacked weights (``experts``), and
``layers`` puts them together behind one FFN interface and a registry of layers.  Plain
PyTorch: nothing here imports ``torch.distributed``, an engine, the network or Hydra.
"""

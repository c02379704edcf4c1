"""Using a trained model: load any run directory (:mod:`moe.inference.load`), decode with a KV
cache (:mod:`moe.inference.generate`), score text (:mod:`moe.inference.evaluate`), and export to
the Hugging Face format (:mod:`moe.inference.export`).  The console scripts ``moe-generate``,
``moe-eval`` and ``moe-export`` are in :mod:`moe.inference.cli`."""

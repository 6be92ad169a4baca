"""ctpi device side: what runs on the Raspberry Pi (never TensorFlow or Keras): core, the inference contract, imports nothing else of device; watch (ctpi watch) imports core, config and cli; node (ctpi dicom) imports those and watch; web (the page and its helpers) imports core, config, cli, watch.journal, node.ledger, tools.bench and tools.plots; tools (operator commands) may import anything; cli.py and config.py stay at the top (tests/test_boundary.py enforces this)."""

__version__ = "0.1.0"

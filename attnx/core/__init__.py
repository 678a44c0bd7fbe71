"""The core of attnx: the explainer, the one pass that runs a model (``trace``), the layout of its
tokens, targets, readouts, the forward check and the explanations they produce.

Nothing here imports the application packages (``cli``, ``demo``, ``report``, ``zoo``, ``data``,
``evaluate``); ``tests/test_contract_import_graph.py`` holds the layer rules.
"""

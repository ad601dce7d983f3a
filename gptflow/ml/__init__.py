"""The ML library the node plugins share: model, tokenizers, data, Lightning
modules, checkpoints, generation. Importing it imports torch: only node
``run()`` functions and the ``generate`` verb do."""

"""Offline data tools: raw image-text data -> packed multimodal Arrow shards (``python -m data_tools``)."""

"""File and tensor formats: GGUF reading and writing (``gguf``), the quantized block types and
their codecs (``qtypes``), and what an architecture's metadata and tensors must be (``arch``).

Pure data handling: nothing here runs a model (``qtypes`` calls the C++ reference codecs).
"""

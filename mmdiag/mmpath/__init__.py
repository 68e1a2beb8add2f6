"""The multimodal path's primitives, shared by mmdiag's model of SGLang and by the
installed-SGLang plug-in: items and hashing, the recv broadcast, timed collectives,
shared-memory segments, and the memory a replay needs."""

"""Traffic from outside mmdiag: SGLang request dumps and sglang.bench_serving files."""

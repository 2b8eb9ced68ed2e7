"""Speed and memory benchmarks of the pipeline stages (`make bench`)."""

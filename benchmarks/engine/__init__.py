"""The engine benchmarks, one module per part (a-d), each with its measurement
(`run(cfg, device)`), its markdown section (`markdown`) and its lines of the
end-of-run summary (`summary_rows`); `benchmarks/bench_engine.py` runs them and
writes the results. The modules import the benchmarks' shared modules (harness,
machine, synthetic, official_cart) from `benchmarks/`, which must be on sys.path."""

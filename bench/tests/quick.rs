//! The benchmark in its quick mode, so that it cannot rot: every measurement runs and reports a
//! time and a peak memory.

#[test]
fn the_quick_benchmark_measures_everything() {
    let device = candle_core::Device::Cpu;
    let measurements =
        vulnmap_bench::run(&vulnmap_bench::Settings::quick(), &device, |_| {}).unwrap();
    let names: Vec<&str> = measurements.iter().map(|m| m.name.as_str()).collect();
    for want in [
        "forward",
        "forward+input-gradient",
        "smoothgrad",
        "attack-iteration",
        "local-attack-map",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for m in &measurements {
        assert!(m.seconds.is_finite() && m.seconds >= 0.0, "{m:?}");
        assert!(m.peak_bytes > 0, "no memory counted for {m:?}");
    }
    // Gradients cost more than the forward pass they start from.
    let of = |name: &str| {
        measurements
            .iter()
            .find(|m| m.name == name && m.batch == 2)
            .unwrap()
    };
    assert!(of("forward+input-gradient").peak_bytes > of("forward").peak_bytes);
}

//! Fuzzed readers (issue 17, item 2): every reader of user files gets every truncation of a
//! small valid file and a few hundred seeded mutations (bit flips, random bytes, huge declared
//! sizes, NaN/Inf payloads); none may panic, allocate more than the input's size justifies, or
//! fail with an error that does not name the file (see `tests/fuzz/harness.rs`). The whole run
//! takes well under a minute; `cargo run --release --example fuzz_readers -- --iterations N`
//! runs longer.

#[path = "fuzz/harness.rs"]
mod harness;
#[path = "fuzz/targets.rs"]
mod targets;

#[global_allocator]
static ALLOC: harness::CountingAlloc = harness::CountingAlloc;

/// Random mutations per target on top of the truncations (seeded: the same inputs every run).
const ITERATIONS: usize = 2500;
const SEED: u64 = 17;

macro_rules! fuzz_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let _one_at_a_time = harness::lock();
                harness::check(&targets::$name(), ITERATIONS, SEED);
            }
        )*
    };
}

fuzz_tests!(
    npy_f32,
    npy_f64_v2,
    init_noise,
    npy_points,
    csv_points,
    idx_images_file,
    idx_labels_file,
    idx_gzip_bytes,
    idx_gzip_content,
    cifar_batch,
    cifar_meta,
    png,
    png_grey,
    jpeg,
    safetensors_checkpoint,
    safetensors_diffusers,
    unet_config,
    scheduler_config,
    mixture_spec,
    mixture_stds,
    info_json,
    checkpoint_state,
    checkpoint_model,
    checkpoint_optimizer,
    checkpoint_ema_verified,
    checkpoint_state_verified,
    checkpoint_manifest,
    checkpoint_metrics,
    image_checkpoint_state,
    fid_stats_npz,
    inception_pth,
    inception_safetensors,
);

/// The allocator's bound has teeth: a reader that trusts a declared size is caught.
#[test]
fn the_allocation_bound_catches_a_reader_that_trusts_a_header() {
    let _one_at_a_time = harness::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("header.bin");
    let trusting = harness::Target {
        name: "trusting",
        seed: 64u32.to_le_bytes().to_vec(),
        input: file.clone(),
        file,
        factor: 1,
        hints: harness::Hints {
            size_fields: vec![(0, 4, false)],
            ..Default::default()
        },
        // allocates what the first 4 bytes declare
        read: Box::new(|p: &std::path::Path| {
            let b = std::fs::read(p).unwrap_or_default();
            let n = b
                .get(..4)
                .map_or(0, |h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize);
            let v: Vec<u8> = Vec::with_capacity(n.min(1 << 29));
            std::hint::black_box(&v);
            Ok(())
        }),
        _dir: Some(dir),
    };
    let r = harness::run(&trusting, 200, SEED);
    assert!(r.failure_count > 0, "no over-allocation was seen");
    assert!(
        r.failures.iter().any(|f| f.contains("over the bound")),
        "{:?}",
        r.failures
    );
}

//! The gradient all-reduce alone, at the sizes of the U-Net presets' gradients: median
//! milliseconds per sum all-reduce of an f32 buffer and the ring's bus bandwidth
//! `2 (K - 1) / K * bytes / time` (the bytes each rank sends and receives; NCCL's "busbw").
//!
//! ```sh
//! cargo build --release --features mpi --example allreduce
//! mpirun -n 2 target/release/examples/allreduce            # --allow-run-as-root as root
//! ```
//!
//! Every timed call starts together (an all-gather first), so no rank waits for another's
//! compute: this is the transport's own cost, which `diffuse train` reports as the all-reduce
//! time minus the wait for the slowest rank.

use diffuse::train::distributed::{launcher_world, mpi_engine::MpiCollective, Collective};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_, size) = launcher_world().ok_or("start it with mpirun -n K")?;
    let comm = MpiCollective::init(size)?;
    let presets = [
        ("1 MB", 262_144usize),
        ("demo (1.06 M parameters)", 1_063_905 + 7),
        ("mnist (6.47 M)", 6_469_889 + 7),
        ("cifar10 (35.7 M)", 35_746_307 + 7),
    ];
    if comm.rank() == 0 {
        println!("{} ranks ({})", comm.size(), comm.name());
    }
    for (name, n) in presets {
        let mut buf = vec![1.0f32; n];
        let iters = if n > 10_000_000 { 5 } else { 20 };
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters + 1 {
            comm.all_gather_u64(0)?; // start together
            let t = std::time::Instant::now();
            comm.all_reduce_sum_f32(&mut buf)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0); // warm-up
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let bytes = 4.0 * n as f64;
        let k = comm.size() as f64;
        if comm.rank() == 0 {
            println!(
                "{name}: {:.2} MB, {:.2} ms median of {iters}, bus bandwidth {:.2} GB/s",
                bytes / 1e6,
                1e3 * median,
                2.0 * (k - 1.0) / k * bytes / median / 1e9
            );
        }
    }
    Ok(())
}

//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`, seeds and every minimised
//! finding) through the fuzz targets' bodies on the stable toolchain: each input must be
//! handled without a panic. libFuzzer itself runs them under `scripts/fuzz.sh` (nightly).

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| body(&data));
        assert!(
            r.is_ok(),
            "{}: the {target} target panicked",
            path.display()
        );
        n += 1;
    }
    assert!(n > 0, "{}: empty corpus", dir.display());
}

#[test]
fn the_checkpoint_loader_survives_its_corpus() {
    replay("checkpoint", targets::checkpoint);
}

#[test]
fn the_scheduler_config_loader_survives_its_corpus() {
    replay("scheduler_config", targets::scheduler_config);
}

#[test]
fn the_idx_loader_survives_its_corpus() {
    replay("idx", targets::idx);
}

#[test]
fn the_npy_loader_survives_its_corpus() {
    replay("npy", targets::npy);
}

#[test]
fn the_mixture_loader_survives_its_corpus() {
    replay("mixture", targets::mixture);
}

#[test]
fn timestep_sigma_and_grid_lists_survive_their_corpus() {
    replay("grid_lists", targets::grid_lists);
}

//! The run directory's promises: nothing already written is lost without `--force`, one writer
//! at a time, `--resume` only on the same images, `merge` only of a complete set of shards, and a
//! format this version can read. Each test runs a one-step pipeline on three images of the fundus
//! benchmark (cached beside the other tests') with the benchmark's trained model.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use vulnmap_data::fs::DirLock;
use vulnmap_pipeline::{config, rundir, runner, Pipeline, RunOptions, Shard};
use vulnmap_train::fundus_benchmark::{BenchmarkConfig, FundusBenchmark};

/// Three benchmark images copied into a folder of their own, and the benchmark's checkpoint.
struct Fixture {
    _root: tempfile::TempDir,
    images: PathBuf,
    checkpoint: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let benchmark = FundusBenchmark::prepare(&BenchmarkConfig::default(), &cache).unwrap();
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let dataset = benchmark.dataset().unwrap();
        for (i, sample) in dataset.samples.iter().take(4).enumerate() {
            std::fs::copy(&sample.path, images.join(format!("eye{i}.png"))).unwrap();
        }
        // The fourth is the one a later test "adds" to the data.
        std::fs::rename(images.join("eye3.png"), root.path().join("eye3.png")).unwrap();
        Fixture {
            _root: root,
            images,
            checkpoint: benchmark.checkpoint,
        }
    })
}

fn pipeline(name: &str) -> Pipeline {
    let f = fixture();
    let yaml = format!(
        "name: {name}\nmodel: {{arch: tiny-resnet, weights: {}}}\ndata: {{glob: '{}/*.png'}}\n\
         steps:\n  - classify: {{top: 1}}\n",
        f.checkpoint.display(),
        f.images.display()
    );
    config::parse(&yaml, Path::new("test.yaml"), Path::new(".")).unwrap()
}

/// The line number (from 1) of the first line of `p`'s saved form that starts with `start`.
fn to_yaml_line(p: &Pipeline, start: &str) -> usize {
    let yaml = config::to_yaml(p).unwrap();
    1 + yaml.lines().position(|l| l.starts_with(start)).unwrap()
}

fn options(out: &Path, resume: bool, force: bool) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        device: Some(vulnmap_models::DeviceName::Cpu),
        shard: None,
        resume,
        force,
        cache: PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        progress: false,
    }
}

fn error(result: vulnmap_pipeline::Result<impl std::fmt::Debug>) -> String {
    vulnmap_data::describe(&result.expect_err("should have been refused"))
}

#[test]
fn a_folder_holding_other_files_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "my own results").unwrap();
    let message = error(runner::run(
        &pipeline("p"),
        &options(dir.path(), false, false),
    ));
    assert!(message.contains("notes.txt"), "{message}");
    assert!(message.contains("--force"), "{message}");
    assert!(
        !dir.path().join("results.jsonl").exists(),
        "nothing written"
    );

    runner::run(&pipeline("p"), &options(dir.path(), false, true)).unwrap();
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my own results");
    assert!(dir.path().join(rundir::FORMAT_FILE).is_file());
}

#[test]
fn finished_results_are_kept_unless_resumed_or_forced() {
    let dir = tempfile::tempdir().unwrap();
    runner::run(&pipeline("p"), &options(dir.path(), false, false)).unwrap();
    let results = dir.path().join("results.jsonl");
    let before = std::fs::read_to_string(&results).unwrap();
    let message = error(runner::run(
        &pipeline("p"),
        &options(dir.path(), false, false),
    ));
    assert!(message.contains("already holds 3 results"), "{message}");
    let message = error(runner::run(
        &pipeline("q"),
        &options(dir.path(), true, false),
    ));
    assert!(message.contains("another pipeline"), "{message}");
    // It names the setting that changed: the first line where the saved pipeline differs.
    let name_line = to_yaml_line(&pipeline("p"), "name:");
    assert!(
        message.contains(&format!(
            "line {name_line} of its pipeline.yaml is `name: p`, this pipeline's is `name: q`"
        )),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&results).unwrap(), before);

    runner::run(&pipeline("q"), &options(dir.path(), false, true)).unwrap();
    let after = std::fs::read_to_string(&results).unwrap();
    assert_eq!(after.lines().count(), 3);
    assert!(std::fs::read_to_string(dir.path().join("pipeline.yaml"))
        .unwrap()
        .contains("name: q"));
}

#[test]
fn a_second_writer_is_refused_and_a_stale_lock_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let held = DirLock::acquire(dir.path()).unwrap();
    let message = error(runner::run(
        &pipeline("p"),
        &options(dir.path(), false, false),
    ));
    assert!(
        message.contains("being written by another vulnmap"),
        "{message}"
    );
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    drop(held);
    // A holder killed with -9 leaves its note behind, but not its lock.
    let lock = dir.path().join(vulnmap_data::fs::LOCK_FILE);
    std::fs::write(&lock, "pid 999999 on elsewhere, since 0 (Unix seconds)\n").unwrap();
    runner::run(&pipeline("p"), &options(dir.path(), false, false)).unwrap();
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), "", "released");
}

#[test]
fn resume_refuses_a_data_source_that_now_resolves_to_other_images() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    // A private copy of the images, as the test changes them.
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for entry in std::fs::read_dir(&f.images).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), images.join(entry.file_name())).unwrap();
    }
    let yaml = format!(
        "name: p\nmodel: {{arch: tiny-resnet, weights: {}}}\ndata: {{glob: '{}/*.png'}}\n\
         steps:\n  - classify: {{top: 1}}\n",
        f.checkpoint.display(),
        images.display()
    );
    let p = config::parse(&yaml, Path::new("test.yaml"), Path::new(".")).unwrap();
    let out = dir.path().join("run");
    runner::run(&p, &options(&out, false, false)).unwrap();
    runner::run(&p, &options(&out, true, false)).unwrap();

    let extra = images.join("eye9.png");
    std::fs::copy(f.images.parent().unwrap().join("eye3.png"), &extra).unwrap();
    let message = error(runner::run(&p, &options(&out, true, false)));
    assert!(
        message.contains("eye9.png") && message.contains("is new"),
        "{message}"
    );
    std::fs::remove_file(&extra).unwrap();

    std::fs::write(images.join("eye1.png"), b"changed").unwrap();
    let message = error(runner::run(&p, &options(&out, true, false)));
    assert!(
        message.contains("eye1.png") && message.contains("bytes"),
        "{message}"
    );
}

#[test]
fn a_run_that_failed_before_writing_rows_does_not_bind_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), "name: broken\n").unwrap();
    std::fs::write(dir.path().join("results.jsonl"), "").unwrap();
    runner::run(&pipeline("p"), &options(dir.path(), false, false)).unwrap();
}

#[test]
fn a_run_directory_of_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(rundir::FORMAT_FILE),
        r#"{"format": 99, "written_by": "vulnmap 9.0.0"}"#,
    )
    .unwrap();
    let message = error(runner::run(
        &pipeline("p"),
        &options(dir.path(), true, false),
    ));
    assert!(message.contains("format 99"), "{message}");
}

#[test]
fn merge_needs_every_shard_unless_partial_and_a_new_out_unless_forced() {
    let root = tempfile::tempdir().unwrap();
    let shard0 = root.path().join("shard0");
    let mut o = options(&shard0, false, false);
    o.shard = Some(Shard { index: 0, count: 2 });
    runner::run(&pipeline("p"), &o).unwrap();
    let out = root.path().join("merged");
    let shards = [shard0.clone()];

    let message = error(runner::merge(&out, &shards, false, false));
    assert!(message.contains("shards 1/2 are missing"), "{message}");
    assert!(message.contains("--allow-partial"), "{message}");
    assert!(!out.exists());

    runner::merge(&out, &shards, false, true).unwrap();
    let message = error(runner::merge(&out, &shards, false, true));
    assert!(message.contains("--force"), "{message}");
    runner::merge(&out, &shards, true, true).unwrap();

    let message = error(runner::merge(&shard0, &shards, true, true));
    assert!(message.contains("one of the shards"), "{message}");
}

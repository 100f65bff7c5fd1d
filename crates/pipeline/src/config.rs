//! Reading a pipeline file: `${VAR}` expansion, parsing, and every check that can be made before
//! anything runs, each problem reported with its line and column. Relative paths are resolved
//! against the file's folder, so the resolved pipeline runs from anywhere.

use crate::error::{Error, Problem, Result};
use crate::limits::*;
use crate::locate::Locations;
use crate::schema::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use vulnmap_attacks::{AttackMode, DualReward, MaskNetworkKind};

/// Reads, expands, parses and checks the pipeline at `path`.
pub fn load(path: &Path) -> Result<Pipeline> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if bytes > crate::yaml_budget::MAX_FILE_BYTES {
        return Err(Error::Config(vec![Problem {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!(
                "{bytes} bytes is not a pipeline file (at most {} bytes)",
                crate::yaml_budget::MAX_FILE_BYTES
            ),
        }]));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parse(&text, path, base)
}

/// Parses and checks pipeline `text`, naming it `origin` in errors and resolving relative paths
/// against `base`.
pub fn parse(text: &str, origin: &Path, base: &Path) -> Result<Pipeline> {
    let base = std::path::absolute(base).map_err(|e| Error::io(base, e))?;
    let text = expand(text, origin)?;
    let parsed = crate::yaml_budget::check(&text).and_then(|()| from_yaml(&text));
    let pipeline: Pipeline = parsed.map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(cut) => message[..cut].to_string(),
            None => message,
        };
        Error::Config(vec![Problem {
            file: origin.to_path_buf(),
            line,
            column,
            path: String::new(),
            message,
        }])
    })?;
    let mut checker = Checker {
        origin: origin.to_path_buf(),
        locations: Locations::of(&text),
        problems: Vec::new(),
    };
    let pipeline = resolve(pipeline, &base);
    checker.pipeline(&pipeline);
    if checker.problems.is_empty() {
        Ok(pipeline)
    } else {
        Err(Error::Config(checker.problems))
    }
}

/// Checks attack settings given outside a file (`vulnmap attack`'s flags) as a pipeline's attack
/// step is checked; `origin` names where they came from, and each problem names the setting.
pub fn check_attack(settings: &AttackSettings, origin: &str) -> Result<()> {
    check_outside_a_file(origin, |c| c.attack(settings, "attack"))
}

/// Checks one step given outside a file (a CLI command's flags) as the same step in a pipeline
/// is checked; `origin` names where it came from, and each problem names the setting.
pub fn check_step(step: &Step, origin: &str) -> Result<()> {
    check_outside_a_file(origin, |c| c.step(step, &step.kind().name(), 0, &[], &[]))
}

fn check_outside_a_file(origin: &str, check: impl FnOnce(&mut Checker)) -> Result<()> {
    let mut checker = Checker {
        origin: PathBuf::from(origin),
        locations: Locations::of(""),
        problems: Vec::new(),
    };
    check(&mut checker);
    if checker.problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(checker.problems))
    }
}

/// Parses pipeline YAML, steps as one-key maps (`- smoothgrad: {...}`) rather than YAML tags.
pub fn from_yaml(text: &str) -> std::result::Result<Pipeline, serde_yaml_ng::Error> {
    serde_yaml_ng::with::singleton_map_recursive::deserialize(
        serde_yaml_ng::Deserializer::from_str(text),
    )
}

/// Writes a pipeline as YAML in the form [`from_yaml`] reads.
pub fn to_yaml(pipeline: &Pipeline) -> Result<String> {
    let mut out = Vec::new();
    let mut serializer = serde_yaml_ng::Serializer::new(&mut out);
    serde_yaml_ng::with::singleton_map_recursive::serialize(pipeline, &mut serializer)
        .map_err(|e| Error::Run(format!("cannot write the pipeline as YAML: {e}")))?;
    drop(serializer);
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Replaces `${NAME}` and `${NAME:-default}` with environment values. `VULNMAP_ASSETS` falls
/// back to the shared assets found beside the checkout, as the tests do.
fn expand(text: &str, origin: &Path) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let Some(len) = rest[start..].find('}') else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let inner = &rest[start + 2..start + len];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let value = std::env::var(name).ok().filter(|v| !v.is_empty());
            let value = value.or_else(|| {
                (name == "VULNMAP_ASSETS")
                    .then(vulnmap_data::assets::assets_dir)
                    .flatten()
                    .map(|p| p.display().to_string())
            });
            match value.or(default.map(str::to_string)) {
                Some(v) => out.push_str(&v),
                None => problems.push(Problem {
                    file: origin.to_path_buf(),
                    line: i + 1,
                    column: line.len() - rest.len() + start + 1,
                    path: String::new(),
                    message: format!(
                        "environment variable {name} is not set (write ${{{name}:-default}} for a default)"
                    ),
                }),
            }
            rest = &rest[start + len + 1..];
        }
        out.push_str(rest);
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(Error::Config(problems))
    }
}

fn absolute(base: &Path, p: &str) -> String {
    if p.starts_with("hf://") || Path::new(p).is_absolute() {
        p.to_string()
    } else {
        base.join(p).display().to_string()
    }
}

/// Makes every path absolute, and writes each attack step's resolved settings (noise strength,
/// learning rate, updates, generator; the local attack's score and spread, the mask attack's
/// network) into its keys, so the saved `pipeline.yaml` says what ran.
fn resolve(mut p: Pipeline, base: &Path) -> Pipeline {
    for step in &mut p.steps {
        match step {
            Step::RandomAttack(s) => s.pin_settings(),
            Step::AlphaSweep(s) => s.pin_settings(),
            Step::LocalAttack(s) => s.pin_local_settings(),
            Step::SaliencyAttack(s) => s.pin_settings(),
            Step::MaskAttack(s) => s.pin_mask_settings(),
            _ => {}
        }
    }
    if let Some(m) = &mut p.model {
        m.weights = m.weights.as_deref().map(|w| absolute(base, w));
        m.onnx = m.onnx.as_deref().map(|w| absolute(base, w));
        m.classes = m.classes.as_deref().map(|w| absolute(base, w));
    }
    let d = &mut p.data;
    d.files = d.files.iter().map(|f| absolute(base, f)).collect();
    d.glob = d.glob.as_deref().map(|g| absolute(base, g));
    d.manifest = d.manifest.as_deref().map(|g| absolute(base, g));
    d.folders = d.folders.as_deref().map(|g| absolute(base, g));
    p
}

/// Step ids: the given id, else the kind, with `-2`, `-3` ... for repeats.
pub fn step_ids(steps: &[Step]) -> Vec<String> {
    let mut seen = HashSet::new();
    steps
        .iter()
        .map(|s| {
            let base = s.given_id().map_or_else(|| s.kind().name(), str::to_string);
            let mut id = base.clone();
            let mut k = 2;
            while !seen.insert(id.clone()) {
                id = format!("{base}-{k}");
                k += 1;
            }
            id
        })
        .collect()
}

struct Checker {
    origin: PathBuf,
    locations: Locations,
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, path: &str, message: impl Into<String>) {
        let position = self.locations.find(path);
        self.problems.push(Problem {
            file: self.origin.clone(),
            line: position.map_or(0, |p| p.line),
            column: position.map_or(0, |p| p.column),
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn check(&mut self, ok: bool, path: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.problem(path, message());
        }
    }

    fn positive(&mut self, value: f64, path: &str) {
        if let Some(problem) = crate::limits::positive_problem(value) {
            self.problem(path, problem);
        }
    }

    fn within(&mut self, value: usize, limit: &crate::limits::Limit, path: &str) {
        if let Some(problem) = limit.problem(value as u64) {
            self.problem(path, problem);
        }
    }

    fn at_least_one(&mut self, value: usize, path: &str) {
        self.check(value >= 1, path, || {
            format!("must be at least 1, got {value}")
        });
    }

    /// Names that become file and folder names: nothing that could climb out of the run
    /// directory or into another.
    fn identifier(&mut self, value: &str, path: &str) {
        let ok = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            && !value.contains("..");
        self.check(ok, path, || {
            format!(
                "must be a name of letters, digits, `_`, `.` and `-` (no `..`), as it names files; got `{value}`"
            )
        });
    }

    fn file(&mut self, value: &str, path: &str) {
        self.check(Path::new(value).is_file(), path, || {
            format!("no such file: {value}")
        });
    }

    fn pipeline(&mut self, p: &Pipeline) {
        self.identifier(&p.name, "name");
        self.within(p.batch_size, &BATCH_SIZE, "batch_size");
        if let Some(c) = p.chunk_size {
            self.within(c, &CHUNK_SIZE, "chunk_size");
        }
        match &p.model {
            Some(m) => {
                if let Some(w) = &m.weights {
                    if !w.starts_with("hf://") {
                        self.file(w, "model.weights");
                    }
                }
                self.check(m.arch.is_some() != m.onnx.is_some(), "model", || {
                    "name the model by exactly one of `arch` (with `weights`) and `onnx`".into()
                });
                if let Some(onnx) = &m.onnx {
                    self.file(onnx, "model.onnx");
                    self.check(m.weights.is_none(), "model.weights", || {
                        "an ONNX file holds its weights; `weights` is for `arch`".into()
                    });
                } else {
                    let onnx_only = [
                        ("normalize", !m.normalize.is_none()),
                        ("input_size", m.input_size.is_some()),
                        ("classes", m.classes.is_some()),
                    ];
                    for (key, given) in onnx_only {
                        self.check(!given, &format!("model.{key}"), || {
                            format!(
                                "`{key}` is for ONNX models (`onnx`); native models know theirs"
                            )
                        });
                    }
                }
                if let Some(size) = m.input_size {
                    self.within(size, &IMAGE_SIZE, "model.input_size");
                }
                if let Some(c) = &m.classes {
                    self.file(c, "model.classes");
                }
            }
            None => self.check(p.data.fundus_benchmark.is_some(), "model", || {
                "a model is needed (arch and weights) unless the data is `fundus_benchmark`".into()
            }),
        }
        self.data(&p.data);
        let unlabelled = !p.data.files.is_empty() || p.data.glob.is_some();
        self.check(
            !(p.explain == Explained::Label && unlabelled),
            "explain",
            || {
                "`label` explains each image's label, and `files` or `glob` give none; \
                 use a manifest, folders, synthetic data or the fundus benchmark"
                    .into()
            },
        );
        self.check(!p.steps.is_empty(), "steps", || "no steps to run".into());
        self.check(
            p.outputs.report_images >= 1,
            "outputs.report_images",
            || "must be at least 1".into(),
        );
        let ids = step_ids(&p.steps);
        for (i, step) in p.steps.iter().enumerate() {
            let at = format!("steps[{i}].{}", step.kind());
            if let Some(id) = step.given_id() {
                self.identifier(id, &format!("{at}.id"));
            }
            self.step(step, &at, i, &ids, &p.steps);
        }
    }

    fn data(&mut self, d: &DataSpec) {
        let sources = [
            !d.files.is_empty(),
            d.glob.is_some(),
            d.manifest.is_some(),
            d.folders.is_some(),
            d.synthetic.is_some(),
            d.fundus_benchmark.is_some(),
        ];
        let n = sources.iter().filter(|&&s| s).count();
        self.check(n == 1, "data", || {
            format!(
                "give exactly one of files, glob, manifest, folders, synthetic, fundus_benchmark (found {n})"
            )
        });
        for (i, f) in d.files.iter().enumerate() {
            self.file(f, &format!("data.files[{i}]"));
        }
        if let Some(g) = &d.glob {
            match glob::glob(g) {
                Err(e) => self.problem("data.glob", format!("invalid pattern: {e}")),
                Ok(paths) => {
                    let any = paths.flatten().any(|p| p.is_file());
                    self.check(any, "data.glob", || format!("no file matches {g}"));
                }
            }
        }
        if let Some(m) = &d.manifest {
            self.file(m, "data.manifest");
        }
        if let Some(f) = &d.folders {
            self.check(Path::new(f).is_dir(), "data.folders", || {
                format!("no such folder: {f}")
            });
        }
        if let Some(s) = &d.synthetic {
            self.within(s.patients, &PATIENTS, "data.synthetic.patients");
            self.within(s.size, &IMAGE_SIZE, "data.synthetic.size");
            for (v, k) in [
                (s.lesion_prevalence, "lesion_prevalence"),
                (s.fa_fraction, "fa_fraction"),
            ] {
                self.check(
                    (0.0..=1.0).contains(&v),
                    &format!("data.synthetic.{k}"),
                    || format!("must be in [0, 1], got {v}"),
                );
            }
        }
        if let Some(b) = &d.fundus_benchmark {
            self.check(b.patients >= 10, "data.fundus_benchmark.patients", || {
                format!(
                    "must be at least 10 (for a 60/20/20 split), got {}",
                    b.patients
                )
            });
            self.within(b.size, &IMAGE_SIZE, "data.fundus_benchmark.size");
            self.within(b.epochs, &EPOCHS, "data.fundus_benchmark.epochs");
            self.positive(b.lr, "data.fundus_benchmark.lr");
        }
        if let Some(l) = d.limit {
            self.at_least_one(l, "data.limit");
        }
        if let Some(r) = d.resize {
            self.within(r as usize, &RESIZE, "data.resize");
        }
    }

    fn attack(&mut self, a: &AttackSettings, at: &str) {
        self.check(
            a.mode.goal(a.target).is_ok(),
            &format!("{at}.target"),
            || "give `target` (a class index) exactly when mode is targeted".into(),
        );
        self.check(
            a.alpha > 0.0 && a.alpha <= 1.0,
            &format!("{at}.alpha"),
            || format!("must be in (0, 1] (pixel units), got {}", a.alpha),
        );
        self.within(a.max_iters, &MAX_ITERS, &format!("{at}.max_iters"));
        self.positive(a.lr, &format!("{at}.lr"));
        self.check(
            a.confidence > 0.0 && a.confidence < 1.0,
            &format!("{at}.confidence"),
            || format!("must be in (0, 1), got {}", a.confidence),
        );
    }

    fn step(&mut self, step: &Step, at: &str, index: usize, ids: &[String], steps: &[Step]) {
        let f = |k: &str| format!("{at}.{k}");
        match step {
            Step::Classify(s) => self.within(s.top, &TOP, &f("top")),
            Step::Gradient(_)
            | Step::InputXGradient(_)
            | Step::GuidedBackprop(_)
            | Step::GradCam(_)
            | Step::GradCamPlusPlus(_)
            | Step::LayerCam(_)
            | Step::EigenCam(_)
            | Step::ScoreCam(_) => {}
            Step::Smoothgrad(s) => {
                self.within(s.samples, &SAMPLES, &f("samples"));
                self.positive(s.noise_level, &f("noise_level"));
            }
            Step::IntegratedGradients(s) => {
                self.within(s.steps, &STEPS, &f("steps"));
                self.check(
                    s.baseline.path_start(s.sigma).is_some(),
                    &f("baseline"),
                    || "Integrated Gradients starts from `black` or `blurred`".into(),
                );
                self.positive(s.sigma, &f("sigma"));
            }
            Step::Occlusion(s) => {
                self.at_least_one(s.window, &f("window"));
                self.at_least_one(s.stride, &f("stride"));
                self.positive(s.sigma, &f("sigma"));
            }
            Step::Lime(s) | Step::KernelShap(s) => {
                self.within(s.cells, &CELLS, &f("cells"));
                self.within(s.samples, &SAMPLES, &f("samples"));
                self.check(s.samples > s.cells * s.cells + 1, &f("samples"), || {
                    format!(
                        "must be more than the superpixels plus one ({}), got {}",
                        s.cells * s.cells + 1,
                        s.samples
                    )
                });
                self.positive(s.sigma, &f("sigma"));
            }
            Step::Rise(s) => {
                self.within(s.masks, &MASKS, &f("masks"));
                self.within(s.cells, &CELLS, &f("cells"));
                self.check(s.keep > 0.0 && s.keep <= 1.0, &f("keep"), || {
                    format!("must be in (0, 1], got {}", s.keep)
                });
            }
            Step::ExtremalPerturbation(s) => {
                self.check(!s.areas.is_empty(), &f("areas"), || "no areas".into());
                for (i, &a) in s.areas.iter().enumerate() {
                    self.check(a > 0.0 && a < 1.0, &format!("{at}.areas[{i}]"), || {
                        format!("must be in (0, 1), got {a}")
                    });
                }
                self.within(s.max_iters, &MAX_ITERS, &f("max_iters"));
                self.at_least_one(s.step, &f("step"));
                self.positive(s.sigma, &f("sigma"));
                self.positive(s.max_blur, &f("max_blur"));
            }
            Step::MaskNetwork(s) => {
                self.within(s.width, &CHANNELS, &f("width"));
                self.check(!s.areas.is_empty(), &f("areas"), || "no areas".into());
                for (i, &a) in s.areas.iter().enumerate() {
                    self.check(a > 0.0 && a < 1.0, &format!("{at}.areas[{i}]"), || {
                        format!("must be in (0, 1), got {a}")
                    });
                }
                self.within(s.epochs, &EPOCHS, &f("epochs"));
                self.within(s.batch_size, &BATCH_SIZE, &f("batch_size"));
                self.positive(s.lr, &f("lr"));
                self.positive(s.blur_sigma, &f("blur_sigma"));
                for (v, k) in [
                    (s.lambda_area, "lambda_area"),
                    (s.lambda_tv, "lambda_tv"),
                    (s.gamma, "gamma"),
                    (s.smooth, "smooth"),
                ] {
                    self.check(v >= 0.0 && v.is_finite(), &f(k), || {
                        format!("must be zero or more, got {v}")
                    });
                }
            }
            Step::RandomAttack(s) => {
                self.attack(&s.attack(), at);
                self.within(s.rounds, &ROUNDS, &f("rounds"));
            }
            Step::AlphaSweep(s) => {
                self.attack(&s.attack(), at);
                self.within(s.rounds, &ROUNDS, &f("rounds"));
                self.check(!s.alphas.is_empty(), &f("alphas"), || "no alphas".into());
                for (i, &a) in s.alphas.iter().enumerate() {
                    self.check(a > 0.0 && a <= 1.0, &format!("{at}.alphas[{i}]"), || {
                        format!("must be in (0, 1], got {a}")
                    });
                }
            }
            Step::LocalAttack(s) => {
                self.attack(&s.attack(), at);
                if let Some(window) = s.window {
                    self.at_least_one(window, &f("window"));
                }
                if let Some(stride) = s.stride {
                    self.at_least_one(stride, &f("stride"));
                }
                self.within(s.seeds, &ROUNDS, &f("seeds"));
                self.check(s.spread().fits(s.game), &f("spread"), || {
                    "attack needs game: delete or occlude (the preserve game leaves the window as it is)".into()
                });
            }
            Step::SaliencyAttack(s) => {
                self.attack(&s.attack(), at);
                self.within(s.samples, &SAMPLES, &f("samples"));
                self.positive(s.noise_level, &f("noise_level"));
                self.check((0.0..1.0).contains(&s.threshold), &f("threshold"), || {
                    format!("must be in [0, 1), got {}", s.threshold)
                });
            }
            Step::MaskAttack(s) => {
                self.attack(&s.attack(), at);
                self.at_least_one(s.base, &f("base"));
                if let Some(cells) = s.cells {
                    self.within(cells, &CELLS, &f("cells"));
                }
                if let Some(lr) = s.mask_lr {
                    self.positive(lr, &f("mask_lr"));
                }
                self.positive(s.beta, &f("beta"));
                self.within(s.samples, &SAMPLES, &f("samples"));
                for (v, k) in [
                    (s.lambda_sparsity, "lambda_sparsity"),
                    (s.lambda_tv, "lambda_tv"),
                    (s.gamma.unwrap_or(0.0), "gamma"),
                ] {
                    self.check(v >= 0.0 && v.is_finite(), &f(k), || {
                        format!("must be zero or more, got {v}")
                    });
                }
                self.within(s.seeds, &ROUNDS, &f("seeds"));
                let dual = s.dual();
                for &a in &s.areas {
                    self.check(a > 0.0 && a < 1.0, &f("areas"), || {
                        format!("an area is a fraction of the image in (0, 1), got {a}")
                    });
                }
                for (given, k) in [
                    (!s.areas.is_empty(), "areas"),
                    (s.lambda_area.is_some(), "lambda_area"),
                    (s.blur_sigma.is_some(), "blur_sigma"),
                    (s.field_of_view == Some(true), "field_of_view"),
                    (s.reward != DualReward::LogProbability, "reward"),
                ] {
                    self.check(!given || dual, &f(k), || {
                        "is a setting of the dual game, not of `game: noise`".into()
                    });
                }
                self.check(
                    !dual || s.attack().mode == AttackMode::Untargeted,
                    &f("mode"),
                    || "the dual game maps the clean label: it is untargeted (`game: noise` can be targeted)".into(),
                );
                if let Some(v) = s.lambda_area {
                    self.check(v >= 0.0 && v.is_finite(), &f("lambda_area"), || {
                        format!("must be zero or more, got {v}")
                    });
                }
                if let Some(v) = s.blur_sigma {
                    self.positive(v, &f("blur_sigma"));
                }
                // The free mask's settings counted in cells.
                for (value, key, does) in [
                    (s.jitter, "jitter", "shifts"),
                    (s.smooth, "smooth", "smooths"),
                ] {
                    let Some(v) = value else { continue };
                    self.check((0.0..=4.0).contains(&v), &f(key), || {
                        format!("is a fraction of a cell in [0, 4], got {v}")
                    });
                    self.check(
                        v == 0.0 || s.network() == MaskNetworkKind::Free,
                        &f(key),
                        || format!("{does} the free mask; add `network: free`"),
                    );
                }
            }
            Step::Metrics(s) => {
                let earlier: Vec<&String> = ids[..index]
                    .iter()
                    .zip(steps)
                    .filter(|(_, s)| s.makes_maps())
                    .map(|(id, _)| id)
                    .collect();
                self.check(!earlier.is_empty(), at, || {
                    "metrics need a map-making step before them".into()
                });
                for (i, id) in s.of.iter().enumerate() {
                    self.check(earlier.contains(&id), &format!("{at}.of[{i}]"), || {
                        format!(
                            "`{id}` is not an earlier map-making step (those are: {})",
                            earlier
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                }
                self.check(!s.measures.is_empty(), &f("measures"), || {
                    "no measures".into()
                });
                self.at_least_one(s.pixels_per_step, &f("pixels_per_step"));
                self.positive(s.blur_sigma, &f("blur_sigma"));
                self.positive(s.sensitivity_radius, &f("sensitivity_radius"));
                self.within(s.sensitivity_samples, &SAMPLES, &f("sensitivity_samples"));
                self.positive(s.infidelity_sigma, &f("infidelity_sigma"));
                self.within(s.infidelity_samples, &SAMPLES, &f("infidelity_samples"));
                self.positive(s.pointing_tolerance, &f("pointing_tolerance"));
                self.check(s.blur_taps % 2 == 1, &f("blur_taps"), || {
                    format!(
                        "must be odd (a kernel centred on the pixel), got {}",
                        s.blur_taps
                    )
                });
            }
            Step::Finetune(s) => {
                self.check(index == 0, at, || {
                    "finetune must be the first step (later steps use the fine-tuned model)".into()
                });
                self.within(s.epochs, &EPOCHS, &f("epochs"));
                self.positive(s.lr, &f("lr"));
                self.check(s.weight_decay >= 0.0, &f("weight_decay"), || {
                    format!("must be zero or more, got {}", s.weight_decay)
                });
                self.within(s.batch_size, &BATCH_SIZE, &f("batch_size"));
                self.within(s.size, &IMAGE_SIZE, &f("size"));
                self.check(s.noise >= 0.0, &f("noise"), || {
                    "must be zero or more".into()
                });
            }
        }
    }
}

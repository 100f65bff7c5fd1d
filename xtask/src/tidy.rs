//! Tidy checks: the architecture's rules as tests, so that `cargo test` fails when the tree breaks
//! one (as rust-analyzer's `xtask/src/tidy.rs`).
//!
//! - every Rust file starts with a module doc (`//!`);
//! - no library crate calls `.unwrap()` outside its `#[cfg(test)]` module;
//! - crate dependencies point down the layers (data <- ops <- models <- train, saliency <- attacks
//!   <- pipeline <- cli, bench), and the test kit is only ever a dev-dependency;
//! - ARCHITECTURE.md's code map names every crate with its package name, and each crate's
//!   `**Modules:**` line lists exactly the modules in its tree;
//! - the pipeline schema holds text only where the value is free (names, paths, ids, layers):
//!   a closed set of values is an enum, never a string checked against a list.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each crate folder, its package name and its layer: a crate may depend only on crates of a
/// lower layer.
const LAYERS: &[(&str, &str, u32)] = &[
    ("crates/data", "vulnmap-data", 0),
    ("crates/ops", "vulnmap-ops", 1),
    ("crates/models", "vulnmap-models", 2),
    ("crates/onnx", "vulnmap-onnx", 3),
    ("crates/train", "vulnmap-train", 3),
    ("crates/saliency", "vulnmap-saliency", 3),
    ("crates/attacks", "vulnmap-attacks", 4),
    ("crates/pipeline", "vulnmap-pipeline", 5),
    ("crates/cli", "vulnmap", 6),
    ("bench", "vulnmap-bench", 6),
    ("crates/testkit", "vulnmap-testkit", 7),
    ("xtask", "xtask", 7),
];

/// Library crates: no `.unwrap()` outside tests.
const LIBRARIES: &[&str] = &[
    "crates/data",
    "crates/ops",
    "crates/models",
    "crates/onnx",
    "crates/train",
    "crates/saliency",
    "crates/attacks",
    "crates/pipeline",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && !name.to_string_lossy().starts_with('.') {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn relative(path: &Path) -> String {
    path.strip_prefix(crate::root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The lines of `text` before its first `#[cfg(test)]`, without comment lines.
fn code_outside_tests(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .take_while(|(_, l)| l.trim() != "#[cfg(test)]")
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l))
}

#[test]
fn every_rust_file_has_a_module_doc() {
    let mut files = Vec::new();
    for (dir, _, _) in LAYERS {
        rust_files(&crate::root().join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} Rust files", files.len());
    let undocumented: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = read(f);
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            !first.starts_with("//!")
        })
        .map(|f| relative(f))
        .collect();
    assert!(
        undocumented.is_empty(),
        "files without a module doc (`//!` first): {undocumented:?}"
    );
}

#[test]
fn libraries_do_not_unwrap_outside_tests() {
    let mut offences = Vec::new();
    for lib in LIBRARIES {
        let mut files = Vec::new();
        rust_files(&crate::root().join(lib).join("src"), &mut files);
        for file in files {
            let text = read(&file);
            for (line, code) in code_outside_tests(&text) {
                if code.contains(".unwrap()") {
                    offences.push(format!("{}:{line}: {}", relative(&file), code.trim()));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "library code must return errors, not unwrap (or say why with expect):\n{}",
        offences.join("\n")
    );
}

/// The `vulnmap*` packages a manifest's `[section]` names.
fn dependencies(manifest: &str, section: &str) -> Vec<String> {
    let mut inside = false;
    let mut names = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == section;
        } else if inside && line.starts_with("vulnmap") {
            let name = line.split(['.', '=', ' ']).next().unwrap_or(line);
            names.push(name.to_string());
        }
    }
    names
}

fn layer_of(package: &str) -> Option<u32> {
    LAYERS
        .iter()
        .find(|(_, name, _)| *name == package)
        .map(|l| l.2)
}

#[test]
fn dependencies_point_down_the_layers() {
    let mut offences = Vec::new();
    for (dir, package, layer) in LAYERS {
        let manifest = read(&crate::root().join(dir).join("Cargo.toml"));
        assert!(
            manifest.contains(&format!("name = \"{package}\"")),
            "{dir}/Cargo.toml should be package {package}"
        );
        for dep in dependencies(&manifest, "[dependencies]") {
            match layer_of(&dep) {
                Some(_) if dep == "vulnmap-testkit" => offences.push(format!(
                    "{package} depends on the test kit outside dev-dependencies"
                )),
                Some(l) if l >= *layer => offences.push(format!(
                    "{package} (layer {layer}) depends on {dep} (layer {l})"
                )),
                Some(_) => {}
                None => offences.push(format!("{package} depends on {dep}, which is in no layer")),
            }
        }
    }
    assert!(offences.is_empty(), "{}", offences.join("\n"));
}

/// The modules of a crate's tree: `src/name.rs` and `src/name/` (as `name`), and one level below
/// (as `name/child`), without the crate roots.
fn modules_in_tree(src: &Path) -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(src) else {
        return modules;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut inner = Vec::new();
            rust_files(&path, &mut inner);
            if inner.is_empty() {
                continue;
            }
            modules.insert(name.clone());
            for child in inner {
                let stem = child.file_stem().map(|s| s.to_string_lossy().into_owned());
                if let Some(stem) = stem.filter(|s| s != "mod") {
                    modules.insert(format!("{name}/{stem}"));
                }
            }
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if !matches!(stem, "lib" | "main") {
                modules.insert(stem.to_string());
            }
        }
    }
    modules
}

/// ARCHITECTURE.md's code map: each `### \`dir\` (package)` heading with the backticked names of
/// the `**Modules:**` paragraph of its section (which may wrap over several lines).
fn code_map(architecture: &str) -> Vec<(String, String, Option<BTreeSet<String>>)> {
    let mut sections: Vec<(String, String, Option<BTreeSet<String>>)> = Vec::new();
    let mut modules: Option<String> = None;
    for line in architecture.lines() {
        if let Some(list) = modules.as_mut() {
            if line.trim().is_empty() {
                let names = list
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect();
                if let Some(section) = sections.last_mut() {
                    section.2 = Some(names);
                }
                modules = None;
            } else {
                list.push_str(line);
            }
        } else if let Some(heading) = line.strip_prefix("### `") {
            let (dir, rest) = heading.split_once('`').unwrap_or((heading, ""));
            let package = rest.trim().trim_start_matches('(').trim_end_matches(')');
            sections.push((dir.to_string(), package.to_string(), None));
        } else if line.starts_with("## ") && !line.starts_with("## Code map") {
            if !sections.is_empty() {
                break;
            }
        } else if let Some(list) = line.strip_prefix("**Modules:**") {
            modules = Some(list.to_string());
        }
    }
    sections
}

#[test]
fn the_code_map_names_what_is_in_the_tree() {
    let root = crate::root();
    let map = code_map(&read(&root.join("ARCHITECTURE.md")));
    let mut problems = Vec::new();
    for (dir, package, _) in LAYERS {
        if !map.iter().any(|(d, p, _)| d == dir && p == package) {
            problems.push(format!("no `### \\`{dir}\\` ({package})` section"));
        }
    }
    for (dir, package, modules) in &map {
        let manifest = root.join(dir).join("Cargo.toml");
        if !manifest.exists() {
            problems.push(format!(
                "section `{dir}` names a folder that is not a crate"
            ));
            continue;
        }
        if !read(&manifest).contains(&format!("name = \"{package}\"")) {
            problems.push(format!(
                "section `{dir}`: the package is not named {package}"
            ));
        }
        let tree = modules_in_tree(&root.join(dir).join("src"));
        match modules {
            None if !tree.is_empty() => {
                problems.push(format!("section `{dir}` has no **Modules:** line"))
            }
            None => {}
            Some(named) => {
                for missing in tree.difference(named) {
                    problems.push(format!(
                        "`{dir}`: module `{missing}` is not on the Modules line"
                    ));
                }
                for extra in named.difference(&tree) {
                    problems.push(format!(
                        "`{dir}`: the Modules line names `{extra}`, not in the tree"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md:\n{}",
        problems.join("\n")
    );
}

/// The schema's fields whose values are free text: a closed set belongs in an enum.
const FREE_TEXT_FIELDS: &[&str] = &[
    "name",
    "description",
    "weights",
    "files",
    "glob",
    "manifest",
    "folders",
    "id",
    "layer",
    "of",
    "labels",
    "onnx",
    "classes",
];

/// The `pub` fields of `source` whose type holds a `String`.
fn string_fields(source: &str) -> Vec<String> {
    source
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("pub ") && !l.starts_with("pub fn") && l.contains("String"))
        .filter_map(|l| l.strip_prefix("pub ")?.split(':').next())
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn settings_with_a_closed_set_of_values_are_enums() {
    let schema = read(&crate::root().join("crates/pipeline/src/schema.rs"));
    let fields = string_fields(&schema);
    assert!(fields.len() >= 10, "found only {fields:?}");
    let stringly: Vec<&String> = fields
        .iter()
        .filter(|f| !FREE_TEXT_FIELDS.contains(&f.as_str()))
        .collect();
    assert!(
        stringly.is_empty(),
        "schema fields typed as text: {stringly:?}; give a closed set of values an enum (serde \
         spelling, #[default]) beside the code that uses it, or list a free-text field here"
    );
}

#[test]
fn the_checks_see_what_they_check() {
    let manifest =
        "[dependencies]\nvulnmap-data.workspace = true\nvulnmap-ops = { path = \"x\" }\n\
                    [dev-dependencies]\nvulnmap-testkit.workspace = true\n";
    assert_eq!(
        dependencies(manifest, "[dependencies]"),
        ["vulnmap-data", "vulnmap-ops"]
    );
    assert_eq!(
        dependencies(manifest, "[dev-dependencies]"),
        ["vulnmap-testkit"]
    );
    let code = "fn a() { x.unwrap() }\n// y.unwrap()\n#[cfg(test)]\nfn b() { z.unwrap() }\n";
    let lines: Vec<usize> = code_outside_tests(code).map(|(n, _)| n).collect();
    assert_eq!(lines, [1]);
    let map = code_map(
        "## Code map\n### `crates/a` (pkg-a)\ntext\n**Modules:** `x`,\n`y/z`.\n\n### `b` (pkg-b)\n## Next\n",
    );
    assert_eq!(
        string_fields("pub struct S {\n    pub mode: String,\n    pub n: usize,\n    pub ids: Vec<String>,\n}\npub fn f() -> String {}"),
        ["mode", "ids"]
    );
    let modules: BTreeSet<String> = ["x", "y/z"].map(String::from).into();
    assert_eq!(
        map,
        [
            ("crates/a".into(), "pkg-a".into(), Some(modules)),
            ("b".into(), "pkg-b".into(), None)
        ]
    );
}

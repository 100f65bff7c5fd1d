//! Property tests of the pipeline loader on untrusted text: mutated shipped pipelines and YAML
//! made of its metacharacters parse or fail with a configuration problem, never a panic, and
//! never expand aliases beyond the loader's budget.

use proptest::prelude::*;
use std::path::Path;
use vulnmap_pipeline::{config, Error};

const SHIPPED: &str = include_str!("../../../pipelines/demo.yaml");

fn load(text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.yaml");
    std::fs::write(&path, text).unwrap();
    match config::load(&path) {
        Ok(_) => Ok(()),
        Err(e @ Error::Config(_)) => {
            let message = e.to_string();
            assert!(message.contains("fuzz.yaml"), "{message}");
            Err(message)
        }
        Err(e) => panic!("not a configuration problem: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn mutated_pipelines_parse_or_name_their_problem(
        edits in prop::collection::vec(
            (any::<usize>(), prop::sample::select(vec![
                "&a ", "*a", ": ", "- ", "[", "]", "{", "}", "\n", "  ", "!!str ", "'", "\"",
                "#", "|", ">", "${X}", "~", "1e999", "-1", "..", "/", "?", ",",
            ])),
            1..6,
        ),
    ) {
        let mut text = SHIPPED.to_string();
        for (at, insert) in edits {
            let mut at = at % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.insert_str(at, insert);
        }
        let _ = load(&text);
    }

    #[test]
    fn arbitrary_small_yaml_parses_or_names_its_problem(
        pieces in prop::collection::vec(prop::sample::select(vec![
            "name: ", "p", "steps:", "data:", "model:", "&a", "*a", "[", "]", "{", "}", ",",
            "\n", "  ", "- ", ": ", "classify", "files", "x.png", "0", "-1", "null", "!tag",
        ]), 0..40),
    ) {
        let _ = load(&pieces.concat());
    }
}

#[test]
fn the_unmutated_demo_parses() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
    config::parse(SHIPPED, &base.join("demo.yaml"), &base).unwrap();
}

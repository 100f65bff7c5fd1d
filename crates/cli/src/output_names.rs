//! File names for each input's outputs in one folder: the input's stem, made unique.

use std::path::PathBuf;

/// One name per input: its file stem, or, when two inputs share a stem (`a/x.png b/x.png`),
/// every name prefixed with the input's place in the list (`0000_x`, `0001_x`) so that no
/// output overwrites another.
pub(crate) fn output_names(inputs: &[PathBuf]) -> Vec<String> {
    let stems: Vec<String> = inputs
        .iter()
        .map(|p| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into())
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    if stems.iter().all(|s| seen.insert(s.as_str())) {
        return stems;
    }
    tracing::warn!(
        "some images share a file name: each output is named by the image's place in the list \
         (0000_<name>, 0001_<name>, ...)"
    );
    stems
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{i:04}_{s}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::output_names;
    use std::path::PathBuf;

    #[test]
    fn two_inputs_with_one_file_name_never_share_an_output() {
        let distinct: Vec<PathBuf> = ["a/x.png", "b/y.jpg"].map(PathBuf::from).to_vec();
        assert_eq!(output_names(&distinct), ["x", "y"]);
        let clash: Vec<PathBuf> = ["a/x.png", "b/x.png", "c/z.png"]
            .map(PathBuf::from)
            .to_vec();
        assert_eq!(output_names(&clash), ["0000_x", "0001_x", "0002_z"]);
    }
}

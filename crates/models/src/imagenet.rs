//! The ImageNet-1k class names, embedded so ImageNet heads are named without any file at hand.

/// One name per line, in the order of the classifier's 1000 logits (from OpenCV's
/// `classification_classes_ILSVRC2012.txt`).
const CLASS_NAMES: &str = include_str!("imagenet_classes.txt");

/// The 1000 ImageNet class names, index `i` naming logit `i`.
pub(crate) fn class_names() -> Vec<String> {
    CLASS_NAMES.lines().map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn there_are_a_thousand_names_in_imagenet_order() {
        let names = super::class_names();
        assert_eq!(names.len(), 1000);
        assert_eq!(names[0], "tench, Tinca tinca");
        assert_eq!(names[282], "tiger cat");
        assert_eq!(names[657], "missile");
        assert_eq!(names[967], "espresso");
    }
}

//! What an attack reports: a row of the paper's Table I, plus the noise and the perturbed image.
//! The variant naming of attack maps lives here too, so every map and row spells it alike.

use candle_core::Tensor;
use serde::Serialize;

/// One attack's result.
#[derive(Debug, Clone, Serialize)]
pub struct AttackOutcome {
    /// Noise strength in pixel units.
    pub alpha: f64,
    /// Cross-entropy of the clean image against its own label (Table I's "origin loss"); for an
    /// attack away from another class ([`crate::Goal::Away`]), against that class.
    pub origin_loss: f64,
    /// The attack's loss when it stopped: `-CE(original label)` untargeted (`-CE(class)` away
    /// from a class), `CE(target)` targeted (plus the mask terms for the mask attack).
    pub final_loss: f64,
    /// The clean image's predicted class.
    pub label_from: usize,
    /// The perturbed image's predicted class when the attack stopped.
    pub label_to: usize,
    /// The class asked for, for targeted attacks.
    pub target: Option<usize>,
    /// Generator updates made before the perturbed image met the goal (0: the untrained noise
    /// already did); the cap when it never did.
    pub iterations: usize,
    /// The perturbed image's probability of `label_to`.
    pub confidence: f64,
    /// The probability of the label the attack is about (untargeted: the clean label; away: its
    /// class; targeted: the target) each time the perturbed image was judged, from the
    /// untrained noise (update 0) to the stop.
    pub probabilities: Vec<f64>,
    /// The clean image's log-odds of that label, `log(p / (1 - p))` computed from the logits.
    pub origin_log_odds: f64,
    /// Its log-odds each time the perturbed image was judged, beside `probabilities`: they keep
    /// telling images apart where the probability has saturated at 1.
    pub log_odds: Vec<f64>,
    /// Whether the goal was met, with confidence above the threshold, within the cap.
    pub success: bool,
    /// Why an unsuccessful attack stopped.
    pub failure: Option<String>,
    /// The perturbation added, `alpha * noise * mask` (`3 x H x W`; not serialised). `None`
    /// where the attack does not keep it: a local attack's windows, whose map would otherwise
    /// hold two images per window.
    #[serde(skip)]
    pub noise: Option<Tensor>,
    /// `clamp(image + noise, 0, 1)` (`3 x H x W`; not serialised), `None` beside `noise`.
    #[serde(skip)]
    pub perturbed: Option<Tensor>,
    /// The mask the noise was multiplied by, when there was one (`H x W`; not serialised).
    #[serde(skip)]
    pub mask: Option<Tensor>,
    /// Each pixel's share of what the first judged perturbation took from the log-odds `lo` of
    /// the attacked label (gave the target's, for a targeted attack), by the trapezoid rule
    /// between the clean image `x` and the perturbed one `x~`: `(x - x~) . (grad lo(x) +
    /// grad lo(x~)) / 2`, summed over channels, exact where the log-odds are quadratic in the
    /// pixels and no noise was clamped. `grad lo(x~)` is the attack loss's gradient as the noise
    /// receives it (zero where the noise was clamped) over `1 - p`; where `lo(x~)` exceeds 40
    /// (8 for an f16 model) that gradient underflows and `grad lo(x)` stands in for it.
    /// `size x size` over a window job's window, `H x W` otherwise; not serialised. Only where
    /// asked for: a local attack spreading its window scores by the attack.
    #[serde(skip)]
    pub contribution: Option<Tensor>,
}

impl AttackOutcome {
    /// The Table I columns as Markdown cells: alpha, origin loss, later loss, label change,
    /// iterations, confidence.
    pub fn table_row(&self) -> String {
        format!(
            "| {} | {:.3e} | {:.4} | from {} to {} | {}{} | {:.4} |",
            self.alpha,
            self.origin_loss,
            self.final_loss,
            self.label_from,
            self.label_to,
            self.iterations,
            if self.success { "" } else { " (failed)" },
            self.confidence
        )
    }
}

/// A map's variant as its row names it: `paper` when no setting differs from the paper's, else
/// the settings that differ (`parts`), joined by `+`.
pub fn variant_name(parts: &[String]) -> String {
    if parts.is_empty() {
        "paper".into()
    } else {
        parts.join("+")
    }
}

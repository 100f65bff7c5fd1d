//! Where each value of a YAML document is, so that checks made after parsing (a missing file, an
//! impossible value) can name the line and column as parse errors do.

use saphyr_parser::{Event, Parser};
use std::collections::HashMap;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub line: usize,
    pub column: usize,
}

/// Positions of the values of a document by path: `steps[2].smoothgrad.samples`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Locations {
    values: HashMap<String, Position>,
}

enum Frame {
    Mapping { path: String, key: Option<String> },
    Sequence { path: String, index: usize },
}

impl Locations {
    /// Reads the positions of `text`; a document that does not parse gives none (the parse error
    /// carries its own position).
    pub(crate) fn of(text: &str) -> Self {
        let mut values = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let position = Position {
                line: span.start.line(),
                column: span.start.col() + 1,
            };
            let is_node = matches!(
                event,
                Event::Scalar(..)
                    | Event::SequenceStart(..)
                    | Event::MappingStart(..)
                    | Event::Alias(_)
            );
            if is_node {
                // A scalar in key position names the next value instead of being one.
                if let Some(Frame::Mapping { key, .. }) = stack.last_mut() {
                    if key.is_none() {
                        if let Event::Scalar(name, ..) = &event {
                            *key = Some(name.to_string());
                        } else {
                            *key = Some(String::from("?"));
                        }
                        continue;
                    }
                }
                let path = match stack.last() {
                    None => String::new(),
                    Some(Frame::Mapping { path, key }) => join(path, key.as_deref().unwrap_or("?")),
                    Some(Frame::Sequence { path, index }) => format!("{path}[{index}]"),
                };
                values.entry(path.clone()).or_insert(position);
                match event {
                    Event::SequenceStart(..) => stack.push(Frame::Sequence { path, index: 0 }),
                    Event::MappingStart(..) => stack.push(Frame::Mapping { path, key: None }),
                    _ => finish_value(&mut stack),
                }
            } else if matches!(event, Event::SequenceEnd | Event::MappingEnd) {
                stack.pop();
                finish_value(&mut stack);
            }
        }
        Self { values }
    }

    /// The position of the value at `path`, or of its nearest enclosing value.
    pub(crate) fn find(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(p) = self.values.get(path) {
                return Some(*p);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// After a value in a mapping comes a key; after an item in a sequence, the next item.
fn finish_value(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Mapping { key, .. }) => *key = None,
        Some(Frame::Sequence { index, .. }) => *index += 1,
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_values() {
        let text = "name: x\nsteps:\n  - classify: {top: 3}\n  - smoothgrad:\n      samples: 25\n";
        let l = Locations::of(text);
        assert_eq!(l.find("name"), Some(Position { line: 1, column: 7 }));
        assert_eq!(l.find("steps[1].smoothgrad.samples").unwrap().line, 5);
        assert_eq!(l.find("steps[0].classify.top").unwrap().line, 3);
        // A key that is absent falls back to its mapping.
        assert_eq!(l.find("steps[1].smoothgrad.seed").unwrap().line, 5);
    }
}

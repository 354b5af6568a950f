//! The JSON body of every 4xx and 5xx answer: a stable machine-readable `error` code, a human `message`, and
//! details that depend on the code (for example `os`, `arch` and `supported` for `unsupported_platform`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>, message: impl Into<String>) -> ErrorBody {
        ErrorBody { error: error.into(), message: message.into(), details: Map::new() }
    }

    /// Adds one detail field.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ErrorBody {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

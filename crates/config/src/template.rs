//! Renders the config file as a minijinja template with environment functions.

use std::path::Path;
use std::sync::Arc;

use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};

/// Looks up an environment variable; tests pass their own.
pub(crate) type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Renders `text`; the error message says what is wrong and on which line.
pub(crate) fn render(text: &str, file: &Path, env: EnvLookup) -> Result<String, String> {
    let mut jinja = Environment::new();
    // An undefined name is a mistake in the file, never an empty string.
    jinja.set_undefined_behavior(UndefinedBehavior::Strict);
    jinja.set_keep_trailing_newline(true);

    let lookup = env.clone();
    jinja.add_function("env", move |var: String| -> Result<String, Error> {
        lookup(&var).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "environment variable {var} is not set (set it, or write env_or(\"{var}\", \"default\"))"
                ),
            )
        })
    });
    jinja.add_function("env_or", move |var: String, default: String| -> String {
        env(&var).unwrap_or(default)
    });

    let name = file.display().to_string();
    jinja
        .add_template_owned(name.clone(), text.to_owned())
        .map_err(|e| describe(&e))?;
    let tmpl = jinja.get_template(&name).map_err(|e| describe(&e))?;
    tmpl.render(()).map_err(|e| describe(&e))
}

fn describe(e: &Error) -> String {
    let detail = e
        .detail()
        .map(str::to_owned)
        .unwrap_or_else(|| e.kind().to_string());
    match e.line() {
        Some(line) => format!("template error at line {line}: {detail}"),
        None => format!("template error: {detail}"),
    }
}

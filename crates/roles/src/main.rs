//! `caddy-build-server`: one binary, one subcommand per role. Kept thin: parse the command
//! line, load the config, set up logging, hand over to the role.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cbs_roles::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cbs_roles::main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Logged once, here, with its whole chain of causes.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

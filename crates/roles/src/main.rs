//! `caddy-build-server`: one binary, one subcommand per role. Kept thin: parse the command
//! line, load the config, set up logging, hand over to the role.

use clap::Parser;

/// jemalloc instead of the system allocator: a server whose tasks allocate on one thread and
/// free on another spent a fifth of its time in glibc's arena locks and consolidation when
/// 10,000 long-polls were answered at once, and fragmented its memory between bursts.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    if let cbs_roles::cli::Command::Client { server, command } = cli.command {
        // The client needs no config file and logs nothing: it prints its answers.
        return runtime.block_on(cbs_roles::client::run(server, command));
    }
    match runtime.block_on(cbs_roles::main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Logged once, here, with its whole chain of causes.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

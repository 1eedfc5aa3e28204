//! `nearfs`: parse the command line, set up logging, call into the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nearfs::mount::{MountConfig, mount};
use nearfs::{commands, demo, prog};

#[derive(Parser)]
#[command(
    name = "nearfs",
    version,
    about = "An extent filesystem in FUSE that runs eBPF next to the data"
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a filesystem on an image file (created sparse if missing) or a block device.
    Mkfs {
        image: PathBuf,
        /// Size of a new image file, e.g. 4G.
        #[arg(long, value_parser = commands::parse_size)]
        size: Option<u64>,
        /// Overwrite an existing nearfs filesystem.
        #[arg(long)]
        force: bool,
    },
    /// Mount a filesystem; returns when the mount is ready.
    Mount {
        image: PathBuf,
        mountpoint: PathBuf,
        /// Comma-separated options: allow_other, default_permissions, ro, rw, direct,
        /// commit=SECS, threads=N, log=FILE, nodev, nosuid, noexec, noatime; over NBD
        /// (IMAGE is nbd://HOST[:PORT]/EXPORT): nbd_delay=USEC, nbd_connections=N,
        /// nbd_timeout=SECS.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Stay in the foreground until unmounted.
        #[arg(short, long)]
        foreground: bool,
    },
    /// Check the filesystem's invariants (exit status as fsck(8): 0 clean, 1 repaired,
    /// 4 errors left, 8 operational error).
    Fsck {
        image: PathBuf,
        /// Repair what can be repaired.
        #[arg(long)]
        repair: bool,
    },
    /// Show format version, sizes, free space and fragmentation.
    Info { image: PathBuf },
    /// Run appcode over FILE's data inside the daemon: prints the program's output on
    /// stdout, its result and costs on stderr.
    Run {
        file: PathBuf,
        /// A loaded program's id, or an object file to load for this run.
        program: String,
        #[command(flatten)]
        opts: prog::RunOpts,
        /// Run it this many times (one load), printing the last run.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
    },
    /// Serve an image or block device over NBD as a storage target: plain block service
    /// for any NBD client, and appcode run next to the device for nearfs mounts
    /// (`nearfs mount nbd://HOST[:PORT]/EXPORT DIR`). Runs in the foreground.
    Serve {
        image: PathBuf,
        /// Address and port to listen on.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// The export's name (the empty name, the default export, always means it too).
        #[arg(long, default_value = "")]
        export: String,
        /// Refuse writes, and runs that write.
        #[arg(long)]
        read_only: bool,
        /// Threads serving each connection (requests of one connection handled at once).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        threads: u32,
        /// Serve blocks only: do not offer the appcode extension.
        #[arg(long)]
        no_appcode: bool,
    },
    /// Offload end to end on a mounted nearfs directory: lookups and a filter, run next
    /// to the data and with ordinary reads, with what each cost.
    Demo { dir: PathBuf },
    /// Work with appcode objects (clang -O2 -g -target bpf).
    Prog {
        #[command(subcommand)]
        command: ProgCommand,
    },
}

#[derive(Subcommand)]
enum ProgCommand {
    /// Verify the programs of an object: exit 0 if all are accepted, 1 if not, with the
    /// verifier's reasons and each program's statistics.
    Verify {
        object: PathBuf,
        /// Only the program in section nearfs/NAME.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print the instruction stream that is verified and run, with source lines.
    Disasm {
        object: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Load a program into the mount that holds PATH (any file or directory of it);
    /// prints its id.
    Load {
        path: PathBuf,
        object: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Run a program here, over an ordinary FILE, without a mount: verified and compiled as
    /// the daemon would, on the checked engine or on rbpf's interpreter (the reference).
    /// Prints the output on stdout, the result and costs on stderr.
    Run {
        object: PathBuf,
        file: PathBuf,
        #[command(flatten)]
        opts: prog::RunOpts,
        #[arg(long, value_enum, default_value = "checked")]
        engine: prog::EngineArg,
    },
    /// List the programs loaded into the mount that holds PATH.
    List { path: PathBuf },
    /// Unload a program (its owner or root).
    Unload { path: PathBuf, id: u64 },
}

fn init_logging(verbose: u8) {
    let default = ["warn", "info", "debug", "trace"][usize::from(verbose.min(3))];
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `mount.fuse.nearfs SPEC DIR [-o opts] [-fnsv]`, as mount(8) calls a helper.
fn mount_helper(args: &[String]) -> anyhow::Result<()> {
    let mut positional = Vec::new();
    let mut cfg_opts = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => cfg_opts.push(it.next().cloned().unwrap_or_default()),
            "-t" => {
                it.next();
            }
            "-f" | "-n" | "-s" | "-v" => {}
            s if s.starts_with("-o") => cfg_opts.push(s[2..].to_string()),
            s => positional.push(s.to_string()),
        }
    }
    let [image, dir] = positional.as_slice() else {
        anyhow::bail!("usage: mount.fuse.nearfs IMAGE MOUNTPOINT [-o OPTIONS]");
    };
    let all = cfg_opts.join(",");
    if all.split(',').any(|o| o == "remount") {
        return nearfs::mount::remount(Path::new(dir), &all);
    }
    let mut cfg = MountConfig::new(image.into(), dir.into());
    for o in &cfg_opts {
        cfg.apply_options(o)?;
    }
    mount(&cfg)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let verbose = cli.verbose;
    match cli.command {
        Command::Mkfs { image, size, force } => commands::mkfs(&image, size, force)?,
        Command::Mount {
            image,
            mountpoint,
            options,
            foreground,
        } => {
            let mut cfg = MountConfig::new(image, mountpoint);
            cfg.foreground = foreground;
            cfg.verbose = verbose;
            for o in &options {
                cfg.apply_options(o)?;
            }
            mount(&cfg)?;
        }
        Command::Serve {
            image,
            listen,
            export,
            read_only,
            threads,
            no_appcode,
        } => nearfs::serve::serve(
            &image,
            &nearfs::serve::ServeConfig {
                listen,
                export,
                read_only,
                threads: threads as usize,
                appcode: !no_appcode,
            },
        )?,
        Command::Fsck { image, repair } => {
            return Ok(ExitCode::from(commands::fsck(&image, repair) as u8));
        }
        Command::Info { image } => commands::info(&image)?,
        Command::Prog { command } => match command {
            ProgCommand::Verify { object, name } => {
                if !prog::verify(&object, name.as_deref())? {
                    return Ok(ExitCode::FAILURE);
                }
            }
            ProgCommand::Disasm { object, name } => prog::disasm(&object, name.as_deref())?,
            ProgCommand::Load { path, object, name } => {
                prog::load_object(&path, &object, name.as_deref())?
            }
            ProgCommand::Run {
                object,
                file,
                opts,
                engine,
            } => prog::run_local(&object, &file, &opts, engine)?,
            ProgCommand::List { path } => prog::list(&path)?,
            ProgCommand::Unload { path, id } => prog::unload(&path, id)?,
        },
        Command::Demo { dir } => demo::run(&dir)?,
        Command::Run {
            file,
            program,
            opts,
            repeat,
        } => prog::run(&file, &program, &opts, repeat)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let argv0 = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .unwrap_or("");
    if argv0.starts_with("mount.") {
        init_logging(0);
        return match mount_helper(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{argv0}: {e:#}");
                ExitCode::from(32) // mount(8): mount failure
            }
        };
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        // `nearfs prog disasm | head` is not a failure.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nearfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

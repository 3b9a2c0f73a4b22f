"""The engine of `crv-verify`: scoring every reasoning step of a user's traces with a bundle
exported by the pipeline (`scorer`), and verifying while generating, where the bundle's
model writes the steps and a flagged one is corrected (`guard`). `inputs` parses the input
lines and `config` holds the options; the command itself (reading, writing, exit statuses)
is `crv.cli.verify`."""

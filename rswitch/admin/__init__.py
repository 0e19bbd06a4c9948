"""The operator's side of a running gateway: typed views (`views`), the actions every face
calls (`actions`) and the versioned HTTP admin API over both (`api`).

`views` and `actions` import no web framework: the core, the console and the CLI use them
directly; only `api` is a face."""

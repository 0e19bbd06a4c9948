from rswitch.cli import app

app(prog_name="rswitch")

"""One module per stage command; `compress.cli` registers what STAGE_COMMANDS returns."""


def STAGE_COMMANDS():
    from compress.commands.bench import bench
    from compress.commands.export import export
    from compress.commands.quantize import calibrate, quantize

    return [export, bench, calibrate, quantize]

"""One module per stage command; `compress.cli` registers what STAGE_COMMANDS returns."""


def STAGE_COMMANDS():
    from compress.commands.bench import bench
    from compress.commands.export import export
    from compress.commands.prune import prune
    from compress.commands.quantize import calibrate, quantize
    from compress.commands.slim import slim

    return [export, bench, calibrate, quantize, slim, prune]

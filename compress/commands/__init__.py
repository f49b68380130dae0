"""One module per stage command; `compress.cli` registers what STAGE_COMMANDS returns."""


def STAGE_COMMANDS():
    from compress.commands.export import export

    return [export]

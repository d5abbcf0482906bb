from fusedit.cli import entry

entry()

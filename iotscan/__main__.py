from iotscan.cli import main

main()

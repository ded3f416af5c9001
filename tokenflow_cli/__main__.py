from tokenflow_cli.cli.app import main

main()

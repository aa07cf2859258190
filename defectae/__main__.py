from defectae.cli import main

main()
